"""gr: GR-2-style video-generative robot policies."""
