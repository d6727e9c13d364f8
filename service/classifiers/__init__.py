"""The classifier feature of the API: `protocol.py` (request and response bodies), `serving.py`
(the logic: definitions, fit and prediction jobs), `router.py` (the thin router). The methods
themselves are the `classify` library; the work runs on the workers (workers/classifying.py)."""
