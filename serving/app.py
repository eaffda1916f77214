"""The module ``serve run`` loads: builds kiln's Serve app from a config's ``args``.

    serve run serving/kiln_app.yaml            # from the repository root

``args.bundle`` is an export bundle directory; any other key is a
``kiln.serve.ServeOptions`` field (max_batch_size, num_replicas, batching, ...).
"""

from kiln.serve.entry import app_builder

__all__ = ["app_builder"]
