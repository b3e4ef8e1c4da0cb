"""Who may do what with a generation: one rule set for every command and button.

- Its requester may do anything with it, anywhere.
- Moderating it (cancel, delete its result): a moderator (Manage Messages or Administrator, as Discord computes it
  for the member in the channel of the interaction) only for generations made in the guild where they hold that
  permission; a bot owner (`discord.owner_ids`) everywhere. A generation made in DMs has no moderator.
- Running it again (reroll, vary), which shows its prompt and builds on its init image: anyone else only in the
  channel where it was posted, where they saw it anyway. A DM generation thus belongs to its requester alone, and
  nobody's prompt or init image is ever posted anywhere it was not before, not even by an owner.
- /admin: bot owners, and members with Administrator or Manage Server where they run it.

Everything here is computed from the interaction and the row, in memory: checks never delay an acknowledgement.
"""

from __future__ import annotations

from dataclasses import dataclass

from bot.replies import Interaction
from bot.rows import Generation


@dataclass(frozen=True)
class Place:
    """Who made a generation, and where."""

    user_id: int
    guild_id: int | None  # None: in DMs
    channel_id: int

    @classmethod
    def of(cls, row: Generation) -> Place:
        return cls(row.user_id, row.guild_id, row.channel_id)


@dataclass(frozen=True)
class Actor:
    """Who is acting, where, and with which powers there."""

    user_id: int
    guild_id: int | None
    channel_id: int
    owner: bool = False  # a bot owner
    moderator: bool = False  # Manage Messages or Administrator in `guild_id`
    admin: bool = False  # Manage Server or Administrator in `guild_id`

    @classmethod
    def of(cls, interaction: Interaction, owner_ids: tuple[int, ...]) -> Actor:
        # Discord computes the permissions for the member in this channel; they come with the interaction. In DMs
        # they describe the DM channel, where nobody moderates.
        permissions = interaction.permissions
        in_guild = interaction.guild_id is not None
        return cls(
            user_id=interaction.user.id,
            guild_id=interaction.guild_id,
            channel_id=interaction.channel_id or 0,
            owner=interaction.user.id in owner_ids,
            moderator=in_guild and (permissions.administrator or permissions.manage_messages),
            admin=in_guild and (permissions.administrator or permissions.manage_guild),
        )


def may_moderate(actor: Actor, made: Place) -> bool:
    """Cancel a generation, or delete its result."""
    if actor.owner or actor.user_id == made.user_id:
        return True
    return made.guild_id is not None and actor.moderator and actor.guild_id == made.guild_id


def may_rerun(actor: Actor, made: Place) -> bool:
    """Reroll a generation or make variations of it, posting the new result where `actor` is."""
    if actor.user_id == made.user_id:
        return True
    return made.guild_id is not None and (actor.guild_id, actor.channel_id) == (made.guild_id, made.channel_id)


def may_administer(actor: Actor) -> bool:
    """Use /admin: pause the queue, cancel or purge anyone's jobs, block users."""
    return actor.owner or actor.admin
