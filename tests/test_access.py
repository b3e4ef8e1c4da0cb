"""Who may see and rerun what: the rules of bot/access.py as a matrix, then through the real bot.

Before bot/access.py, Manage Messages in *any* guild (one a user made for themselves) let /reroll replay anyone's
generation, DM prompts and init images included, and /cancel stop anyone's job.
"""

from __future__ import annotations

import pytest

from bot.access import Actor, Place, may_moderate, may_rerun
from bot.rows import NewGeneration
from tests.botharness import Harness, custom_ids, fake_fixture, harness_fixture, png, result_id

__all__ = ["fake_fixture", "harness_fixture"]  # fixtures used by name

ALICE, BOB, MOD, OWNER = 1, 2, 3, 4
GUILD, OTHER_GUILD = 10, 20
CHANNEL, OTHER_CHANNEL, DM, MODS_OWN_CHANNEL = 100, 101, 102, 200

PUBLIC = Place(ALICE, GUILD, CHANNEL)
IN_DMS = Place(ALICE, None, DM)
IMG2IMG = Place(ALICE, GUILD, CHANNEL)  # an init image of hers: the same rules, nothing may move it elsewhere

ACTORS = {
    "requester": Actor(ALICE, GUILD, OTHER_CHANNEL),
    "other user, same channel": Actor(BOB, GUILD, CHANNEL),
    "other user, other channel": Actor(BOB, GUILD, OTHER_CHANNEL),
    "moderator, same guild": Actor(MOD, GUILD, OTHER_CHANNEL, moderator=True),
    "moderator of another guild": Actor(MOD, OTHER_GUILD, MODS_OWN_CHANNEL, moderator=True, admin=True),
    "owner, elsewhere": Actor(OWNER, OTHER_GUILD, MODS_OWN_CHANNEL, owner=True),
}

# (actor, generation) -> (may cancel or delete it, may rerun it where the actor is)
EXPECTED = {
    ("requester", "public"): (True, True),
    ("requester", "dm"): (True, True),
    ("requester", "img2img"): (True, True),
    ("other user, same channel", "public"): (False, True),
    ("other user, same channel", "dm"): (False, False),
    ("other user, same channel", "img2img"): (False, True),
    ("other user, other channel", "public"): (False, False),
    ("other user, other channel", "dm"): (False, False),
    ("other user, other channel", "img2img"): (False, False),
    ("moderator, same guild", "public"): (True, False),
    ("moderator, same guild", "dm"): (False, False),
    ("moderator, same guild", "img2img"): (True, False),
    ("moderator of another guild", "public"): (False, False),
    ("moderator of another guild", "dm"): (False, False),
    ("moderator of another guild", "img2img"): (False, False),
    ("owner, elsewhere", "public"): (True, False),
    ("owner, elsewhere", "dm"): (True, False),
    ("owner, elsewhere", "img2img"): (True, False),
}
GENERATIONS = {"public": PUBLIC, "dm": IN_DMS, "img2img": IMG2IMG}


@pytest.mark.parametrize(("actor", "generation"), list(EXPECTED))
def test_the_matrix(actor: str, generation: str) -> None:
    made = GENERATIONS[generation]
    got = (may_moderate(ACTORS[actor], made), may_rerun(ACTORS[actor], made))
    assert got == EXPECTED[actor, generation]


async def test_the_rules_hold_through_every_command_and_button(harness: Harness) -> None:
    fake = harness.fake
    async with harness.running() as bot:
        # A variation Alice made in her DMs: her prompt and her init image.
        private_id = await bot.store.add(
            NewGeneration(
                kind="variation",
                user_id=fake.alice.id,
                channel_id=fake.dm_channel(fake.alice).id,
                prompt="my secret",
                negative="",
                scheduler="ddim",
                steps=3,
                guidance=7.5,
                model="tiny",
                seed=1,
                strength=0.5,
                init_image=png("blue"),
            )
        )
        # A server admin replays it in their server: refused, and nothing is posted.
        refused = await fake.slash_command("reroll", {"id": private_id}, user=fake.admin)
        message = await refused.wait_message(lambda m: m.ephemeral and not m.loading)
        assert message.content.startswith(f"You have no generation #{private_id} here")
        assert not [m for m in refused.messages if m.attachments]

        # A job of Alice's in the guild: Bob cannot cancel it, the guild's admin can.
        bot.executor.pause(True)
        queued = await fake.slash_command("imagine", {"prompt": "a long wait"})
        progress = await queued.wait_message(lambda m: "queued" in m.content)
        gen_id = int(next(c for c in custom_ids(progress) if c.endswith(":cancel")).split(":")[1])
        by_bob = await fake.slash_command("cancel", {"id": gen_id}, user=fake.bob)
        answer = await by_bob.wait_message(lambda m: m.ephemeral and not m.loading)
        assert answer.content.startswith(f"#{gen_id} is not yours")
        assert gen_id in bot.generations.live
        by_admin = await fake.slash_command("cancel", {"id": gen_id}, user=fake.admin)
        answer = await by_admin.wait_message(lambda m: m.ephemeral and not m.loading)
        assert answer.content == f"Cancelling #{gen_id}."
        await fake.wait_for(lambda: "cancelled" in progress.content)
        bot.executor.pause(False)

        # The Reroll button on Alice's public result, pressed by Bob where it was posted: allowed.
        public = await harness.result_of(await fake.slash_command("imagine", {"prompt": "a public square"}))
        press = await fake.message_component(f"gen:{result_id(public)}:reroll", public, user=fake.bob)
        rerolled = await harness.result_of(press)
        row = await harness.wait_row(result_id(rerolled) or 0, lambda r: r.finished)
        assert (row.user_id, row.parent_id, row.status) == (fake.bob.id, result_id(public), "done")
