"""`gsafe review`: a local web app to triage a campaign's candidates and label them (see README.md here)."""
