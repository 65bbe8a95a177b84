"""Durability: kill -9 the broker at random moments of a write loop; nothing acknowledged is lost.

A writer thread adds entries through a real broker for the whole test, recording each add the
broker acknowledged. Each round the test kills the broker with SIGKILL, checks that the file
it left (and its `.bak`) decrypts and holds every entry acknowledged before the kill, then
starts a new broker over the stale socket the dead one left and unlocks it with the password.

Each add costs one interactive KDF (owner auth), which dwarfs the save, so a kill at a
uniformly random moment rarely lands inside a write. The rounds therefore rotate through
three kill moments: any time; a few random milliseconds after a save's temp file appears
(mid-write); and the instant the vault file itself changes (with an atomic rename that is
just before the acknowledgement; with an in-place write it is mid-write, and the vault is
left truncated). Ballast notes make a save long enough to be hit in the middle.
Set APM_CRASH_SEED to replay a run.
"""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import SecretStr

from broker import paths
from broker.cli.client import BrokerClient
from broker.core import vault_file
from broker.core.crypto import PROFILES, Cipher, normalize_password
from broker.core.vault import Change, Payload, Vault
from broker.wire.errors import ApmError, BrokerUnavailable, VaultLocked
from broker.wire.protocol import EntryAddParams, EntryGetParams, EntryListParams, SecretValue

from .conftest import PASSWORD, Broker, register_secret

pytestmark = pytest.mark.slow

ROUNDS = 20
OWNER = SecretStr(PASSWORD)
BALLAST_ENTRIES = 8
BALLAST_NOTE = "n" * 50_000


def secret_for(name: str) -> str:
    return f"pw-of-{name}-kept-safe"


class Writer(threading.Thread):
    """Adds entries until stopped, recording which adds the broker acknowledged.

    An add that gets no answer in time counts as not acknowledged (the broker may still have
    stored it). The wait adapts to how long adds take on this machine, so load does not turn
    every add into a timeout.
    """

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.stop = threading.Event()
        self.attempted: list[str] = []
        self.acked: list[str] = []
        self.errors: list[str] = []
        self._durations: list[float] = [0.1]

    def timeout(self) -> float:
        return min(3.0, max(0.3, 5 * statistics.median(self._durations[-20:])))

    def run(self) -> None:
        client = BrokerClient(self.address, client_name="crash-test")
        try:
            while not self.stop.is_set():
                name = f"w-{len(self.attempted)}"
                register_secret(secret_for(name))
                self.attempted.append(name)
                params = EntryAddParams(
                    type="login",
                    name=name,
                    fields={"username": "crash"},
                    secrets={"password": SecretValue(value=SecretStr(secret_for(name)))},
                )
                started = time.monotonic()
                try:
                    client.call("entry.add", params, password=OWNER, timeout=self.timeout())
                except BrokerUnavailable:
                    client.close()  # a late answer must not be taken for a later call's
                    client = BrokerClient(self.address, client_name="crash-test")
                    continue
                except VaultLocked:
                    time.sleep(0.01)  # a restarted broker, not unlocked yet
                    continue
                except ApmError as exc:
                    self.errors.append(exc.code)
                    continue
                self._durations.append(time.monotonic() - started)
                self.acked.append(name)
        finally:
            client.close()


def wait_serving(broker: Broker, address: str, timeout: float = 30.0) -> None:
    """Until this broker process (not a dead predecessor) answers a ping."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert broker.proc is not None
        if broker.proc.poll() is not None:
            raise AssertionError(f"broker exited ({broker.proc.returncode}): {broker.output()}")
        try:
            with BrokerClient(address) as client:
                if client.call("broker.ping", timeout=0.1).pid == broker.pid:
                    return
        except BrokerUnavailable:
            time.sleep(0.02)
    raise AssertionError("restarted broker did not answer")


def create_ballasted_vault(path: Path) -> bytearray:
    """A vault with ballast, made in-process. Returns a copy of its data key."""
    vault = Vault.create(path, normalize_password(PASSWORD), PROFILES["interactive"])
    for n in range(BALLAST_ENTRIES):
        secret = Change(fields={}, secrets={"content": "x"}, remove_fields=[])
        vault.add("note", f"ballast-{n}", "default", [], None, BALLAST_NOTE, secret)
    dek = bytearray(vault._dek)
    vault.close()
    return dek


def login_names(path: Path, dek: bytearray) -> set[str]:
    """Read, checksum and decrypt a vault file with its data key (no KDF needed)."""
    blob = vault_file.read(path)
    payload = Payload.model_validate_json(Cipher(dek).open(blob.payload, blob.payload_ad))
    return {e.name for e in payload.entries if e.type == "login"}


def temp_files(directory: Path, vault_path: Path) -> set[str]:
    """Temp files of saves that had not been renamed yet."""
    return {p.name for p in directory.glob(f".{vault_path.name}.*tmp")}


def poll_until(condition: Callable[[], object], limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.0002)  # not a pure spin: the broker needs the other core


def file_state(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def test_every_acknowledged_write_survives_kill_9_at_random_moments(home: Path) -> None:
    seed = int(os.environ.get("APM_CRASH_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    p = paths.resolve({"APM_HOME": str(home)})
    address, vault_path = p.broker_addr, p.vault
    backup = vault_path.with_name(vault_path.name + ".bak")
    register_secret(PASSWORD)
    dek = create_ballasted_vault(vault_path)
    broker = Broker(home).start(wait=False)
    writer = Writer(address)
    killed_mid_save = 0
    stale_temps: set[str] = set()
    try:
        wait_serving(broker, address)
        with BrokerClient(address) as client:
            client.call("vault.unlock", password=OWNER)
        writer.start()

        for round_ in range(ROUNDS):
            where = f"round {round_}, APM_CRASH_SEED={seed}"
            wanted = len(writer.acked) + rng.randint(0, 2)
            poll_until(lambda wanted=wanted: len(writer.acked) >= wanted, limit=30)
            if round_ % 3 == 0:
                time.sleep(rng.uniform(0, 0.12))
            elif round_ % 3 == 1:
                poll_until(lambda stale=stale_temps: temp_files(home, vault_path) - stale)
                time.sleep(rng.uniform(0, 0.002))
            else:
                before = file_state(vault_path)
                poll_until(lambda before=before: file_state(vault_path) != before)
            broker.kill9()
            acked = set(writer.acked)  # every ack so far came from the broker just killed

            new_temps = temp_files(home, vault_path) - stale_temps
            killed_mid_save += bool(new_temps)
            stale_temps |= new_temps
            assert broker.socket.exists(), "kill -9 should leave the socket file behind"
            broker.start(wait=False)  # it boots while we check; it stays locked until told

            names = login_names(vault_path, dek)
            assert acked <= names, (where, sorted(acked - names))
            assert names <= set(writer.attempted), where
            login_names(backup, dek)  # the previous version is whole too

            wait_serving(broker, address)  # the stale socket was replaced, not refused
            with BrokerClient(address) as client:
                unlocked = client.call("vault.unlock", password=OWNER)
            assert unlocked.entries >= len(names) + BALLAST_ENTRIES, where

        writer.stop.set()
        writer.join(timeout=30)
        assert not writer.is_alive()
        assert writer.errors == []
        acked = set(writer.acked)
        assert len(acked) >= ROUNDS // 2, "too few adds were acknowledged to prove anything"
        with BrokerClient(address) as client:
            listed = client.call("entry.list", EntryListParams(type="login"), password=OWNER)
            assert acked <= {e.name for e in listed.entries}
            last = writer.acked[-1]
            got = client.call("entry.get", EntryGetParams(ref=last), password=OWNER)
            assert got.value.get_secret_value() == secret_for(last)
        broker.stop()
        for path in (vault_path, backup):
            Vault.open(path, normalize_password(PASSWORD)).close()  # by password, in-process

        assert killed_mid_save >= 1, "no kill landed during a save; the test proved too little"
    finally:
        writer.stop.set()
        broker.stop()
        writer.join(timeout=30)
        # Crashed saves leave partial copies of the (encrypted) vault; they hold nothing the
        # vault and its backup do not, and the hygiene sweep of this home reads those two.
        for name in temp_files(home, vault_path):
            (home / name).unlink()
