"""Integrations with other libraries, each in its own module and imported only on request.

``fastattn.integrations.transformers``: fastattn as a Hugging Face transformers attention
implementation (``register()``, then ``attn_implementation="fastattn"``).

Nothing here is imported by ``import fastattn``, and this package imports none of those libraries:
a user without transformers pays nothing for the integration.
"""
