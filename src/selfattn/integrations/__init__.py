"""Drop-in integrations with other libraries; each imports its library lazily (``selfattn.integrations.hf``)."""
