"""video-latents: videos in object storage -> VAE latents as Parquet tensor columns, on Ray."""
