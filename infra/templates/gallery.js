// Sorts the table by a clicked header (numbers by value, NaN last) and puts the cards in the same order.
(function () {
  var table = document.getElementById('candidates');
  var cards = document.getElementById('cards');
  var headers = table.tHead.rows[0].cells;
  function key(cell, numeric) {
    var v = cell.getAttribute('data-value');
    if (!numeric) { return v || ''; }
    var f = parseFloat(v);
    return isNaN(f) ? Infinity : f;
  }
  function sortBy(col, ascending) {
    var numeric = headers[col].getAttribute('data-type') === 'num';
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[col], numeric), y = key(b.cells[col], numeric);
      if (x === y) { return 0; }
      if (numeric && x === Infinity) { return 1; }
      if (numeric && y === Infinity) { return -1; }
      return (x < y ? -1 : 1) * (ascending ? 1 : -1);
    });
    rows.forEach(function (row) {
      body.appendChild(row);
      var card = document.getElementById(row.getAttribute('data-card'));
      if (card) { cards.appendChild(card); }
    });
    for (var i = 0; i < headers.length; i++) { headers[i].removeAttribute('aria-sort'); }
    headers[col].setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
  }
  Array.prototype.forEach.call(headers, function (th, col) {
    th.addEventListener('click', function () {
      sortBy(col, th.getAttribute('aria-sort') !== 'ascending');
    });
  });
  for (var i = 0; i < headers.length; i++) {
    if (headers[i].getAttribute('data-key') === 'q_value') { sortBy(i, true); }
  }
  document.body.setAttribute('data-ready', String(cards.querySelectorAll('.card').length));
})();
