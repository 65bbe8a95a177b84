"""Durability: kill -9 the broker at random moments of a commit loop; nothing acknowledged is lost.

A writer thread adds entries through a real broker for the whole test, recording each add the
broker acknowledged. Each round the test kills the broker with SIGKILL, checks that the vault
it left (the SQLite file and its WAL) opens and holds every entry acknowledged before the kill,
then starts a new broker over the stale socket the dead one left and unlocks it.

Each add costs one interactive KDF (owner auth), which dwarfs the commit, so a kill at a
uniformly random moment rarely lands inside one. The rounds therefore rotate through three
kill moments: any time; the instant the WAL changes (a commit is being written: the kill lands
between its write and its fsync or acknowledgement); and a few random milliseconds after that.

This is what chose `synchronous=FULL` with SQLite's default checkpoints (vault_db.py): with it
every round holds every acknowledged write. 20 rounds in CI; `APM_FULL=1` runs 200. Set
APM_CRASH_SEED to replay a run.
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
from broker.core import vault_db
from broker.core.crypto import normalize_password
from broker.core.vault import Payload, Vault
from broker.core.vault_file import Header
from broker.wire.errors import ApmError, BrokerUnavailable, VaultLocked
from broker.wire.protocol import (
    EntryAddParams,
    EntryGetParams,
    EntryListParams,
    InitParams,
    SecretValue,
)

from .conftest import PASSWORD, Broker, register_secret

pytestmark = pytest.mark.slow

ROUNDS = 200 if os.environ.get("APM_FULL") == "1" else 20
OWNER = SecretStr(PASSWORD)


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


def read_dek(path: Path) -> bytearray:
    """The vault's data key, by password (one KDF, in-process), for the checks below."""
    vault = Vault.open(path, normalize_password(PASSWORD))
    try:
        return bytearray(vault._dek)
    finally:
        vault.close()


def login_names(path: Path, dek: bytearray) -> set[str]:
    """Open the vault a killed broker left, with its data key (no KDF): every record must
    authenticate and match the state record. Reads only: no checkpoint."""
    db = vault_db.VaultDb.open(path)
    try:
        vault = Vault(
            path, Header.decode(db.kdf_json), db.keyblock, bytearray(dek), Payload(), db=db
        )
        vault._load_rows()
        return {e.name for e in vault.entries.values() if e.type == "login"}
    finally:
        db.close()


def wal_state(path: Path) -> tuple[int, int]:
    try:
        st = path.with_name(path.name + "-wal").stat()
    except FileNotFoundError:
        return (0, 0)
    return st.st_size, st.st_mtime_ns


def poll_until(condition: Callable[[], object], limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.0002)  # not a pure spin: the broker needs the other core


def test_every_acknowledged_write_survives_kill_9_at_random_moments(home: Path) -> None:
    seed = int(os.environ.get("APM_CRASH_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    p = paths.resolve({"APM_HOME": str(home)})
    address, vault_path = p.broker_addr, p.vault
    register_secret(PASSWORD)
    broker = Broker(home).start(wait=False)
    writer = Writer(address)
    in_flight = 0
    try:
        wait_serving(broker, address)
        with BrokerClient(address) as client:
            client.call("vault.init", InitParams(profile="interactive"), password=OWNER)
        dek = read_dek(vault_path)
        writer.start()

        for round_ in range(ROUNDS):
            where = f"round {round_}, APM_CRASH_SEED={seed}"
            wanted = len(writer.acked) + rng.randint(0, 2)
            poll_until(lambda wanted=wanted: len(writer.acked) >= wanted, limit=30)
            if round_ % 3 == 0:
                time.sleep(rng.uniform(0, 0.12))
            else:
                before = wal_state(vault_path)
                poll_until(lambda before=before: wal_state(vault_path) != before)
                if round_ % 3 == 2:
                    time.sleep(rng.uniform(0, 0.003))
            attempted_at_kill = len(writer.attempted)
            broker.kill9()
            acked = set(writer.acked)  # every ack so far came from the broker just killed
            in_flight += attempted_at_kill > len(acked)
            assert broker.socket.exists(), "kill -9 should leave the socket file behind"

            names = login_names(vault_path, dek)
            assert acked <= names, (where, sorted(acked - names))
            assert names <= set(writer.attempted), where

            broker.start(wait=False)
            wait_serving(broker, address)  # the stale socket was replaced, not refused
            with BrokerClient(address) as client:
                unlocked = client.call("vault.unlock", password=OWNER)
            assert unlocked.entries >= len(names), where

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
        Vault.open(vault_path, normalize_password(PASSWORD)).close()  # by password, in-process
        assert in_flight >= 1, "no kill landed during an add; the test proved too little"
    finally:
        writer.stop.set()
        broker.stop()
        writer.join(timeout=30)
