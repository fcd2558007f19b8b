"""The harness the tests and the benches share: real brokers on free ports (``brokers``, also a
pytest plugin of fixtures), the API as a live server (``servers``) and a signature-checking webhook
receiver (``webhooks``). ``bench/`` imports from ``tests`` this package only (``tests/unit/
test_layering.py``), so nothing here imports the tests' own helpers."""
