"""sdbot: a self-hosted Stable Diffusion bot for Discord, built on sdengine."""
