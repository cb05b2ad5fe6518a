"""Model presets: diffusers configs of the synthetic models (seeded random weights)."""
