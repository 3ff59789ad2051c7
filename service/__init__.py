"""Tailor's BentoML service: a thin HTTP skin over the ``adapters`` library, plus client and CLI.

Imports go one way: ``service`` -> ``adapters``; the library never imports bentoml or fastapi.
"""
