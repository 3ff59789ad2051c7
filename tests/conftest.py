from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tests.service_fixture: the served processes (served, served_generation, served_training,
# served_text_only), registered once here so that every module shares each one; a module that
# imported one would get a server of its own, so modules request them by name only.
pytest_plugins = ["tests.postgres", "tests.service_fixture"]
