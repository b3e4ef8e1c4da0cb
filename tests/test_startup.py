"""Start-up of the real `sdbot` entry point: what it says when something is wrong, and `--check`.

Most tests run the bot as a child process: only a process shows the exit status, the whole output, and that no
torch is imported for `--help`. torch's import is what makes each cost seconds, so `--check` runs in process, where
torch is loaded already.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch

from bot.__main__ import main
from tests.botprocess import ROOT, BotProcess, bot_config
from tests.fakediscord import FakeDiscord

# Runs the bot with discord.py pointed at argv[1] (a base URL: a fake, a closed port, a name that cannot resolve).
LAUNCH = """
import sys, discord, yarl
base = yarl.URL(sys.argv[1])
discord.http.Route.BASE = str(base / "api/v10")
discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = base.with_scheme("ws")
from bot.__main__ import main
sys.exit(main(sys.argv[2:]))
"""
CEILING = 120.0  # seconds for one process: torch's import alone can take 30 s on a busy 2-core machine


async def sdbot(*args: str, discord_at: str = "", token: str | None = "fake-bot-token") -> tuple[int, str]:
    """Run `sdbot ARGS` (with Discord at `discord_at`) to its end; return its exit status and its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("DISCORD_TOKEN", None)
    if token is not None:
        env["DISCORD_TOKEN"] = token
    command = ["-c", LAUNCH, discord_at, *args] if discord_at else ["-m", "bot", *args]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *command,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), CEILING)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


def said(output: str) -> list[str]:
    """The lines sdbot itself printed (log lines carry a timestamp and a level instead)."""
    return [line for line in output.splitlines() if line.startswith("sdbot")]


def write_config(tmp_path: Path, model: str = 'path = "tiny"') -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.toml"
    path.write_text(f'[model]\n{model}\n\n[storage]\ndatabase = "{(tmp_path / "db" / "sdbot.sqlite3").as_posix()}"\n')
    return path


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A local port that refuses connections: bound, so nobody else takes it, but not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# -- help, version, config errors: fast, no torch ------------------------------------------------------------------

LIGHT = """
import sys
from bot.__main__ import main
for argv in (["--help"], ["--version"], ["--config", "missing.toml"]):
    try:
        status = main(argv)
    except SystemExit as exit:
        status = exit.code
    print("status", status, flush=True)
print("imported", sorted(name for name in ("torch", "diffusers", "discord") if name in sys.modules))
"""


async def test_help_version_and_config_errors_answer_without_importing_torch() -> None:
    status, output = await sdbot("--help")
    assert status == 0
    for text in ("DISCORD_TOKEN", "default: config.toml", "--check", "exit status", "0 ", "1 ", "2 ", "3 "):
        assert text in output, text

    status, output = await sdbot("--version")
    assert (status, output.strip()) == (0, f"sdbot {importlib.metadata.version('sdbot')}")

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LIGHT, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output = (await asyncio.wait_for(process.communicate(), CEILING))[0].decode()
    assert re.findall(r"status (\d+)", output) == ["0", "0", "2"], output
    assert "sdbot: config file 'missing.toml' not found: copy config.example.toml and edit it" in output
    assert "imported []" in output, output  # no torch, and not even discord.py, before these answers


# -- Discord unreachable at start ------------------------------------------------------------------------------------


async def test_unreachable_discord_is_one_line_and_exit_3(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with closed_port() as port:
        (refused_status, refused), (unresolved_status, unresolved) = await asyncio.gather(
            sdbot("--config", str(config), discord_at=f"http://127.0.0.1:{port}"),
            sdbot("--config", str(config), discord_at="http://discord.invalid:8080"),  # .invalid never resolves
        )
    for status, output, line in (
        (refused_status, refused, f"sdbot: cannot reach Discord at 127.0.0.1:{port} (connection refused)"),
        (unresolved_status, unresolved, "sdbot: cannot reach Discord at discord.invalid:8080 (its name does not"),
    ):
        assert status == 3, output
        assert "Traceback" not in output, output
        assert said(output) == [output.splitlines()[-1]], output  # one line of its own, the last
        assert said(output)[0].startswith(line), output
        assert said(output)[0].endswith(": check the network"), output
        # The model was ready before the login was tried.
        assert output.index("loaded sd1 model 'tiny'") < output.index("logging in"), output


# -- broken local setup: reported before any contact with Discord --------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as fake:
        yield fake


async def test_broken_model_fails_at_once_without_contacting_discord(tmp_path: Path, fake: FakeDiscord) -> None:
    """A bad model path; `device = "cuda"` without CUDA goes the same way (`test_check_failure_is_one_line`)."""
    config = write_config(tmp_path, f'path = "{(tmp_path / "no-such-model").as_posix()}"')
    status, output = await sdbot("--config", str(config), discord_at=fake.base_url)
    assert status == 1, output
    assert "Traceback" not in output, output
    assert said(output) == [output.splitlines()[-1]], output
    assert said(output)[0].startswith(f"sdbot: model '{(tmp_path / 'no-such-model').as_posix()}' cannot be loaded: ")
    assert fake.requests == [] and fake.identify_count == 0


# -- sdbot --check ---------------------------------------------------------------------------------------------------


async def test_check_reports_each_part_and_never_contacts_discord(
    tmp_path: Path, fake: FakeDiscord, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process, in a thread (main runs its own event loop), with discord.py pointed at the fake: anything that
    tried Discord would show in the fake's log."""
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    config = write_config(tmp_path)
    assert await asyncio.to_thread(main, ["--check", "--config", str(config)]) == 0
    output = capsys.readouterr()
    assert output.err == ""
    lines = output.out.splitlines()
    assert lines[0] == f"sdbot: config '{config}' ok", lines
    assert lines[1] == f"sdbot: database '{(tmp_path / 'db' / 'sdbot.sqlite3').as_posix()}' ok", lines
    model = r"sdbot: model 'tiny' loaded on \S+ \(\w+, memory fast, without a safety checker\) in [\d.]+ s"
    assert re.fullmatch(model, lines[2]), lines
    assert re.fullmatch(r"sdbot: test image generated \(16x16, 1 dpmpp_2m step\) in [\d.]+ s", lines[3]), lines
    # No token is only a warning: a newcomer runs --check before they have one.
    assert lines[4] == "sdbot: warning: DISCORD_TOKEN is not set: export your bot token in it before you start the bot"
    assert lines[5:] == [f"sdbot: all checks passed; start the bot with: sdbot --config {config}"]
    assert (tmp_path / "db" / "sdbot.sqlite3").exists()  # created and migrated
    assert fake.requests == [] and fake.identify_count == 0


@pytest.mark.parametrize(
    ("model", "status", "message"),
    [
        ('path = "/no/such/model"', 1, "sdbot: model '/no/such/model' cannot be loaded: No model at '/no/such/model'"),
        (
            'path = "tiny"\nunknown = 1',
            2,
            "sdbot: model.unknown: unknown key; [model] takes channels_last, compile, cuda_graphs, device, dtype, "
            "fuse_qkv, loras, max_cost, max_side, memory, path",
        ),
        ("database", 1, "sdbot: database '{db}' cannot be used (unable to open database file): check [storage]"),
        ('path = "tiny"\ndevice = "cuda"', 1, "sdbot: model 'tiny' cannot be loaded: CUDA is not available"),
    ],
    ids=["model path", "config", "database", "cuda"],
)
def test_check_failure_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: str, status: int, message: str
) -> None:
    """In process (torch is loaded already here): the same `main` as the child processes run."""
    if model.endswith('"cuda"') and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    config = write_config(tmp_path, 'path = "tiny"' if model == "database" else model)
    if model == "database":
        (tmp_path / "db" / "sdbot.sqlite3").mkdir(parents=True)  # a folder where the file should be
    assert main(["--check", "--config", str(config)]) == status
    err = capsys.readouterr().err
    assert err.startswith(message.format(db=(tmp_path / "db" / "sdbot.sqlite3").as_posix())), err
    assert err.count("\n") == 1, err


# -- the network drops after start -----------------------------------------------------------------------------------


class Relay:
    """A TCP relay in front of the fake Discord that the test cuts and restores, as a network outage would: while
    it is down its port refuses connections."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]  # the same port again after a `down`

    async def down(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, upstream_writer}
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))
        self._writers -= {writer, upstream_writer}

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


async def test_lost_connection_is_retried_with_one_log_line_per_attempt(tmp_path: Path, fake: FakeDiscord) -> None:
    relay = Relay(fake.port)
    await relay.up()
    # Everything the bot is told about Discord's address (the REST base, the gateway and resume URLs) goes
    # through the relay.
    fake.port = relay.port
    log_path = tmp_path / "bot.log"
    async with BotProcess.start(fake, bot_config(tmp_path, fake), log_path, timeout=CEILING) as bot:
        sessions = fake.identify_count + fake.resume_count
        start = log_path.stat().st_size
        await relay.down()

        def attempts() -> list[str]:
            text = log_path.read_bytes()[start:].decode(errors="replace")
            return [line for line in text.splitlines() if "reconnect" in line]

        # The log file has no change notification: poll it, with a generous ceiling.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CEILING
        while len(attempts()) < 2:
            assert loop.time() < deadline, bot.log_tail()
            await asyncio.sleep(0.1)
        await relay.up()
        await fake.wait_for(lambda: fake.identify_count + fake.resume_count > sessions, CEILING)

        outage = log_path.read_bytes()[start:].decode(errors="replace")
        assert "Traceback" not in outage, outage
        for line in attempts():
            assert re.search(r"WARNING .*cannot reach Discord \(connection refused\): attempting a reconnect in ", line)
        # Every line is a log record of its own (timestamp first, maybe coloured): no traceback or other lines.
        record = re.compile(r"(\x1b\[[\d;]*m)?\[?\d{4}-\d\d-\d\d ")
        assert all(record.match(line) for line in outage.splitlines() if line), outage
        assert bot.returncode is None
    await relay.down()
