"""/admin: pause or resume the queue, cancel any job, purge a user's jobs, block or unblock a user.

Two locks on one door. The group's `default_permissions` makes Discord show it only to members with Administrator,
but a server admin can hand any command to anyone under Server Settings > Integrations. So every command also
checks, when it runs, that the caller is a bot owner (`discord.owner_ids`) or has Administrator or Manage Server
where they run it. Every action is logged with who did it: to the log, and to the `admin_actions` table.

Cancelling and purging follow bot/access.py: a server admin stops only the jobs asked for in their server; an owner
stops any. Blocks are bot-wide and live in SQLite (and in memory), so they survive restarts. The generation service,
the buttons and the other cogs enforce them (see `GenerationService.refuse_blocked` and `SDBot.not_blocked`).
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3

import discord
from discord import app_commands
from discord.ext import commands

from bot import render
from bot.access import Actor, may_administer, may_moderate
from bot.app import SDBot
from bot.replies import NO_PINGS, Interaction, UserError, tell

log = logging.getLogger(__name__)

REFUSED = "Only server admins (Administrator or Manage Server) and the bot's owners can use /admin."
MAX_LISTED = 25  # blocked users shown by /admin blocked; a message holds 2000 characters


def who(user: discord.abc.User) -> str:
    """A user as plain text for a reply: escaped name and id, no mention."""
    return f"{render.escape(user.display_name)} ({user.id})"


class Admin(commands.Cog):
    admin = app_commands.Group(
        name="admin",
        description="Bot admin tools: pause the queue, cancel jobs, block users.",
        default_permissions=discord.Permissions(administrator=True),
    )

    def __init__(self, bot: SDBot) -> None:
        self.bot = bot

    async def interaction_check(self, interaction: Interaction, /) -> bool:
        """The runtime lock: runs for every /admin command, whatever Discord's permission settings let through."""
        if may_administer(self._actor(interaction)):
            return True
        command = interaction.command.qualified_name if interaction.command else "admin"
        log.warning(
            "refused /%s to user %s in guild %s: not a bot admin", command, interaction.user.id, interaction.guild_id
        )
        interaction.extras["error_handled"] = True  # answered here: the tree's on_error stays quiet on the CheckFailure
        await tell(interaction, REFUSED)
        return False

    async def _done(
        self, interaction: Interaction, action: str, sentence: str, *, target: int | None = None, detail: str = ""
    ) -> None:
        """Record an action (log and SQLite) with who did it, then tell the admin what happened."""
        actor = interaction.user
        log.info(
            "admin action by user %s (%r) in guild %s: %s %s %r",
            actor.id,
            actor.name,
            interaction.guild_id,
            action,
            target if target is not None else "",
            detail,
        )
        try:
            await self.bot.store.log_admin_action(
                actor.id, action, target=target, detail=detail, guild_id=interaction.guild_id
            )
        except sqlite3.Error as exc:  # the action is done already: say so, not that the request was refused
            log.warning("could not record admin action %s by user %s in the database: %s", action, actor.id, exc)
            sentence += " My database could not record it right now, so only the bot's log file has it."
        await interaction.followup.send(sentence, ephemeral=True, allowed_mentions=NO_PINGS)

    def _actor(self, interaction: Interaction) -> Actor:
        return Actor.of(interaction, self.bot.settings.discord.owner_ids)

    def _cancel_all(self, interaction: Interaction, user_id: int) -> list[int]:
        """Cancel the queued or running generations of a user that the admin may stop; returns their ids."""
        actor = self._actor(interaction)
        live_jobs = self.bot.generations.live
        theirs = sorted(
            gen_id
            for gen_id, live in live_jobs.items()
            if live.made.user_id == user_id and may_moderate(actor, live.made)
        )
        for gen_id in theirs:
            live_jobs[gen_id].job.cancel()
        return theirs

    @admin.command(description="Pause the queue: running jobs finish, queued ones wait.")
    async def pause(self, interaction: Interaction) -> None:
        await interaction.response.defer(ephemeral=True)
        self.bot.executor.pause(True)
        await self._done(interaction, "pause", "Paused: running jobs finish, and queued ones wait for /admin resume.")

    @admin.command(description="Resume the queue after /admin pause.")
    async def resume(self, interaction: Interaction) -> None:
        await interaction.response.defer(ephemeral=True)
        self.bot.executor.pause(False)
        await self._done(interaction, "resume", "Resumed: queued jobs start again.")

    @admin.command(description="Cancel anyone's queued or running job in this server.")
    @app_commands.describe(id="The generation id")
    async def cancel(self, interaction: Interaction, id: app_commands.Range[int, 1, 2**62]) -> None:
        await interaction.response.defer(ephemeral=True)
        live = self.bot.generations.live.get(id)
        if live is None:
            raise UserError(f"#{id} is not queued or running.")
        if not may_moderate(self._actor(interaction), live.made):
            raise UserError(f"#{id} was asked for in another server: only its admins or a bot owner can cancel it.")
        live.job.cancel()
        await self._done(interaction, "cancel", f"Cancelling #{id}.", target=id)

    @admin.command(description="Cancel all of a user's queued and running jobs.")
    @app_commands.describe(user="Whose jobs to cancel")
    async def purge(self, interaction: Interaction, user: discord.User) -> None:
        await interaction.response.defer(ephemeral=True)
        cancelled = self._cancel_all(interaction, user.id)
        ids = ", ".join(f"#{gen_id}" for gen_id in cancelled)
        sentence = f"Cancelling {ids} of {who(user)}." if cancelled else f"{who(user)} has nothing queued or running."
        await self._done(interaction, "purge", sentence, target=user.id, detail=ids)

    @admin.command(description="Block a user from the bot (kept across restarts); also cancels their jobs.")
    @app_commands.describe(user="Who to block", reason="Why, for the other admins (not shown to the user)")
    async def block(
        self, interaction: Interaction, user: discord.User, reason: app_commands.Range[str, 0, 200] = ""
    ) -> None:
        await interaction.response.defer(ephemeral=True)
        if user.id in self.bot.settings.discord.owner_ids:
            raise UserError(f"{who(user)} is one of the bot's owners and cannot be blocked.")
        reason = reason[:200]  # Discord enforces the length, a forged payload does not
        if not await self.bot.store.block(user.id, by=interaction.user.id, reason=reason):
            raise UserError(f"{who(user)} is already blocked: /admin unblock lifts it.")
        cancelled = self._cancel_all(interaction, user.id)
        extra = f" and cancelling {len(cancelled)} of their jobs" if cancelled else ""
        await self._done(interaction, "block", f"Blocked {who(user)}{extra}.", target=user.id, detail=reason)

    @admin.command(description="Lift a block.")
    @app_commands.describe(user="Who to unblock")
    async def unblock(self, interaction: Interaction, user: discord.User) -> None:
        await interaction.response.defer(ephemeral=True)
        if not await self.bot.store.unblock(user.id):
            raise UserError(f"{who(user)} is not blocked.")
        await self._done(interaction, "unblock", f"Unblocked {who(user)}.", target=user.id)

    @admin.command(description="List the blocked users.")
    async def blocked(self, interaction: Interaction) -> None:
        await interaction.response.defer(ephemeral=True)
        users = await self.bot.store.blocked_users()
        if not users:
            content = "Nobody is blocked."
        else:
            lines = [f"{len(users)} blocked, longest first:"]
            for user in users[:MAX_LISTED]:
                when = discord.utils.format_dt(dt.datetime.fromtimestamp(user.created_at, dt.UTC), "R")
                why = f": {render.clip_escaped(render.one_line(user.reason), 60)}" if user.reason else ""
                lines.append(f"`{user.user_id}` by `{user.blocked_by}` {when}{why}")
            if len(users) > MAX_LISTED:
                lines.append(f"…and {len(users) - MAX_LISTED} more.")
            content = "\n".join(lines)
        await interaction.followup.send(content, ephemeral=True, allowed_mentions=NO_PINGS)


async def setup(bot: SDBot) -> None:
    await bot.add_cog(Admin(bot))
