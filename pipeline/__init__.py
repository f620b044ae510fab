"""video-latents: videos in object storage -> VAE latents as Parquet tensor columns, on Ray.

``read_latents`` and ``LatentDataset`` read an OUTPUT back; they are imported on first use so
the CLI starts without torch.
"""

_READERS = ("read_latents", "LatentDataset", "LatentIterableDataset")


def __getattr__(name):
    if name in _READERS:
        from pipeline import readers

        return getattr(readers, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
