"""ONNX Runtime serving path: the same tenants' adapters, mixed in one batch, on ORT.

The frozen base is exported once per base fingerprint into a graph whose adapted layers take
the batch's gathered LoRA weights as inputs (``layout``, ``export``), cached on disk beside the
store (``graph_cache``), optionally quantised to int8 (``quantize``), and run behind the task
seam as a ``TaskServing`` (``serving``); ``runtime`` picks torch or ONNX for an engine and falls
back to torch, with the reason logged, for a base that cannot. Nothing here imports bentoml.
"""
