// gsafe review: keyboard-first labelling. No inline script (the page's CSP forbids it); the session
// token comes from the body's data-token attribute and goes back in a header with every write.
(function () {
  'use strict';
  var body = document.body;
  var token = body.getAttribute('data-token');
  var cards = Array.prototype.slice.call(document.querySelectorAll('#cards .card'));
  var status = document.getElementById('status');
  var current = 0;
  var relevance = {};

  function say(text, isError) {
    status.textContent = text;
    status.className = isError ? 'error' : '';
  }

  function select(k) {
    if (!cards.length) { return; }
    current = Math.max(0, Math.min(cards.length - 1, k));
    cards.forEach(function (c, j) { c.classList.toggle('current', j === current); });
    cards[current].focus({preventScroll: true});
    cards[current].scrollIntoView({block: 'nearest'});
  }

  function nextOpen(from) {
    for (var j = from + 1; j < cards.length; j++) {
      if (!cards[j].classList.contains('labelled')) { return j; }
    }
    return Math.min(from + 1, cards.length - 1);
  }

  function post(url, payload) {
    return fetch(url, {
      method: 'POST',
      headers: {'Content-Type': 'application/json', 'X-Gsafe-Token': token},
      body: JSON.stringify(payload || {})
    }).then(function (r) {
      return r.json().then(function (data) {
        if (!r.ok) { throw new Error(data.error || ('HTTP ' + r.status)); }
        return data;
      });
    });
  }

  function label(card, name, group) {
    var i = Number(card.getAttribute('data-i'));
    var tag = card.querySelector('.tag-input').value;
    var payload = {i: i, label: name, tag: tag, group: !!group};
    if (relevance[i] !== undefined) { payload.relevance = relevance[i]; }
    card.setAttribute('data-pending', name);
    return post('/api/label', payload).then(function (out) {
      card.removeAttribute('data-pending');
      card.classList.add('labelled');
      card.setAttribute('data-label', name);
      card.querySelector('.verdict').textContent = name.replace('_', ' ') +
        (out.suppressed ? ' (+ ' + out.suppressed + ' in its group)' : '');
      var n = document.getElementById('n-labelled');
      n.textContent = String(Number(n.textContent) + 1 + (out.suppressed || 0));
      say('saved: ' + name.replace('_', ' ') + (out.suppressed ? ', group of ' + (out.suppressed + 1) + ' suppressed' : ''));
      body.setAttribute('data-saved', String(Number(body.getAttribute('data-saved') || 0) + 1));
    }).catch(function (err) {
      card.removeAttribute('data-pending');
      say(err.message, true);
    });
  }

  function exportLabels() {
    say('exporting…');
    post('/api/export').then(function (out) {
      say('exported ' + out.labels + ' labels; MLflow run ' + out.run_id);
    }).catch(function (err) { say(err.message, true); });
  }

  function setView(view) {
    body.classList.toggle('one', view === 'one');
    body.classList.toggle('grid', view !== 'one');
    body.setAttribute('data-view', view);
    select(current);
  }

  var keys = {
    'j': function () { select(current + 1); }, 'ArrowRight': function () { select(current + 1); },
    'ArrowDown': function () { select(current + 1); },
    'k': function () { select(current - 1); }, 'ArrowLeft': function () { select(current - 1); },
    'ArrowUp': function () { select(current - 1); },
    'i': function () { act('interesting', false); },
    'n': function () { act('not_interesting', false); },
    'a': function () { act('artefact', false); },
    'A': function () { act('artefact', true); },
    't': function () { if (cards.length) { cards[current].querySelector('.tag-input').focus(); } },
    'v': function () { setView(body.getAttribute('data-view') === 'one' ? 'grid' : 'one'); },
    'r': function () { window.location.reload(); },
    'e': exportLabels,
    '?': function () { body.classList.toggle('help-open'); }
  };

  function act(name, group) {
    if (!cards.length) { return; }
    var card = cards[current];
    label(card, name, group);
    select(nextOpen(current));
  }

  document.addEventListener('keydown', function (ev) {
    var target = ev.target;
    if (target && target.classList && target.classList.contains('tag-input')) {
      if (ev.key === 'Enter' || ev.key === 'Escape') { ev.preventDefault(); select(current); }
      return;
    }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) { return; }
    if (/^[0-5]$/.test(ev.key) && cards.length) {
      var i = Number(cards[current].getAttribute('data-i'));
      relevance[i] = Number(ev.key);
      cards[current].querySelector('.relevance').textContent = ev.key;
      ev.preventDefault();
      return;
    }
    var fn = keys[ev.key];
    if (fn) { ev.preventDefault(); fn(); }
  });

  cards.forEach(function (card, j) {
    card.addEventListener('click', function (ev) {
      var button = ev.target.closest('button[data-label]');
      select(j);
      if (button) { label(card, button.getAttribute('data-label'), button.getAttribute('data-group') === '1'); }
    });
  });

  setView(body.getAttribute('data-view'));
  select(0);
  body.setAttribute('data-ready', String(cards.length));
})();
