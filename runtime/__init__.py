"""pocketlm runtime: what runs next to a device. Never imports torch or the toolchain."""
