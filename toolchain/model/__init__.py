"""pocketlm toolchain: pocketlm's own transformer definition."""
