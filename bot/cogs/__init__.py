"""One cog per feature, each loaded by `SDBot.setup_hook` as an extension (`async def setup(bot)`)."""
