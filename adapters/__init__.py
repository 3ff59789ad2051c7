"""Tailor's adapter library: one frozen base model, many tenants' LoRA adapters.

No web framework here: the BentoML service, the trainer, the benchmarks and the tests all
drive this library. Modules: ``base`` (the frozen base model), ``artifact`` (the adapter file
format), ``peft_format`` (peft interchange), ``store`` (bytes), ``registry`` (tenants, versions,
aliases), ``catalog`` (publishing through both), ``runtime`` (resident cache, device slots and
the mixed-tenant forward pass).
"""
