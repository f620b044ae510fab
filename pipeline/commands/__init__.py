"""Commands other than ``encode``, one module each; the CLI dispatches to them."""
