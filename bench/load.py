"""Load benchmark: the service under load, side by side with the floor, in one run.

Seeds a store with N callers x M calls (synthetic transcripts of 10 to 40 turns built from
`--seed`, so runs are repeatable) through the project's own ingestion code, starts the
service with the production command on loopback, and drives it with `wrk` at a fixed
concurrency: client-data for known and unknown callers, search for known callers, signed
post-call deliveries. The same client, at the same concurrency, then drives a bare FastAPI
endpoint answering a constant JSON (`bench/floor_app.py`) under the same command: the
floor. Prints requests per second, p50/p90/p99/max latency, errors, and the server
worker's peak memory, with the ratios to the floor. Run by hand (needs `wrk`:
`apt-get install wrk`):

    .venv/bin/python bench/load.py                         # 10,000 callers x 10 calls
    .venv/bin/python bench/load.py --callers 100 --calls 10
    .venv/bin/python bench/load.py --scale                 # 1,000 then 100,000 stored calls

Seeded stores are cached (`--cache-dir`) and copied into a fresh temporary directory for
every run, so a run never sees another run's post-call deliveries. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
# The user's environment, as it was before anything here ran: the tests' helpers (the
# throw-away PostgreSQL) set their own defaults in os.environ when imported, such as
# SEARCH_EMBEDDINGS=off, which must not reach the services measured.
USER_ENVIRONMENT = dict(os.environ)
BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO_ROOT))

from elaoms.config import Settings  # noqa: E402
from elaoms.memory.records import CallRecord  # noqa: E402
from elaoms.memory.sqlite import SCHEMA  # noqa: E402
from elaoms.phone import normalize_caller_id  # noqa: E402
from elaoms.search.ranking import INDEX_FORMAT  # noqa: E402
from elaoms.services import Services  # noqa: E402
from elaoms.webhooks.signature import sign  # noqa: E402

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "elevenlabs"
HMAC_KEY = "wsec_bench_hmac_key_0123456789abcdef"
API_KEY = "bench-workspace-secret-0123456789"
ENDPOINTS = ["client-data", "search-data", "post-call"]
SEED_FORMAT = 1  # bump when the synthetic data changes, so cached stores are rebuilt
START = 1_704_067_200  # 2024-01-01T00:00:00Z: the first seeded call

# --------------------------------------------------------------------------------------
# Synthetic, deterministic calls to a dental front desk (the fixture's agent)
# --------------------------------------------------------------------------------------
FIRST = [
    "Maria",
    "James",
    "Aisha",
    "Tom",
    "Priya",
    "Chen",
    "Lucas",
    "Emma",
    "Omar",
    "Sofia",
    "Daniel",
    "Grace",
    "Ivan",
    "Fatima",
    "Noah",
    "Hannah",
    "Mateo",
    "Yuki",
    "Samuel",
    "Olivia",
    "Kwame",
    "Elena",
    "Ravi",
    "Chloe",
    "Diego",
    "Nina",
    "Pedro",
    "Laura",
    "Ahmed",
    "Zoe",
]
LAST = [
    "Lopez",
    "Smith",
    "Khan",
    "Nguyen",
    "Patel",
    "Garcia",
    "Kim",
    "Brown",
    "Rossi",
    "Silva",
    "Cohen",
    "Okafor",
    "Muller",
    "Tanaka",
    "Novak",
    "Haddad",
    "Jensen",
    "Moreau",
    "Singh",
    "Walker",
    "Costa",
    "Ibrahim",
    "Schmidt",
    "Park",
    "Fischer",
    "Reyes",
]
RELATIONS = [
    "daughter",
    "son",
    "husband",
    "wife",
    "mother",
    "father",
    "grandson",
    "granddaughter",
    "partner",
]
KIDS = [
    "Sofia",
    "Leo",
    "Mia",
    "Ben",
    "Ava",
    "Sam",
    "Lily",
    "Max",
    "Ella",
    "Jack",
    "Ruby",
    "Theo",
    "Isla",
    "Finn",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
TIMES = ["8 am", "9 am", "10 am", "11:30", "noon", "1 pm", "2:15", "3 pm", "4:30", "5 pm"]
DOCTORS = ["Dr. Chen", "Dr. Alvarez", "Dr. Osei", "Dr. Brennan", "Dr. Kaur"]
INSURERS = ["Delta Dental", "Cigna", "MetLife", "Aetna", "Guardian", "Humana"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
]

# topic: (title, caller lines, agent lines); {slots} are filled per call
TOPICS: dict[str, tuple[str, list[str], list[str]]] = {
    "reschedule": (
        "Appointment moved",
        [
            "I need to move my {what} appointment, the one on {day}.",
            "Something came up at work, can we do {day2} instead?",
            "{time2} works for me, as long as it is with {doctor}.",
            "Could you send me a text reminder the day before?",
        ],
        [
            "Of course. I can see an opening on {day2} at {time2} with {doctor}.",
            "Done: your {what} is now {day2} at {time2}.",
            "I have cancelled the {day} slot so you will not be charged.",
            "Yes, a reminder goes out the evening before.",
        ],
    ),
    "toothache": (
        "Toothache, urgent visit",
        [
            "My {relation} {kid} has a sore tooth since {day}, it is getting worse.",
            "It hurts when {kid} drinks something cold, and the gum looks swollen.",
            "Can {kid} be seen today? We can come right after school.",
            "Should I give {kid} something for the pain until then?",
        ],
        [
            "I'm sorry to hear that. {doctor} keeps an emergency slot at {time}.",
            "Children's ibuprofen is fine; please avoid very cold or sweet drinks.",
            "I booked {kid} for {day2} at {time2} with {doctor}.",
            "If the swelling spreads to the cheek, please go to urgent care.",
        ],
    ),
    "billing": (
        "Question about a bill",
        [
            "I got a bill for {amount} dollars and I thought insurance covered it.",
            "The statement says the x-ray from {month} was not covered.",
            "Can I pay it in two parts? {amount} is a lot this month.",
            "Please email me the itemized invoice.",
        ],
        [
            "Let me check. The claim for {month} was partly declined by {insurer}.",
            "We can split it: half now, half in {month2}, no fee.",
            "I've resubmitted the x-ray claim to {insurer} with the right code.",
            "The itemized invoice is on its way to your email.",
        ],
    ),
    "insurance": (
        "Insurance change",
        [
            "I changed jobs and my new insurance is {insurer}.",
            "My member number starts with {code}; do you take that plan?",
            "Will my cleaning in {month} still be covered?",
        ],
        [
            "Yes, we are in network with {insurer}.",
            "I updated your file; cleanings are covered twice a year on that plan.",
            "Please bring the card to your next visit so we can scan it.",
        ],
    ),
    "new_patient": (
        "New patient registration",
        [
            "I just moved to the area and I'm looking for a new dentist.",
            "My last check-up was in {month}, at my old practice in {city}.",
            "Do you see children too? My {relation} {kid} would need a check-up.",
        ],
        [
            "Welcome! I can register you and {kid} together.",
            "We'll ask {city} to send your records and x-rays over.",
            "The first visit is a full exam with {doctor}, about an hour.",
        ],
    ),
    "refill": (
        "Prescription refill",
        [
            "{doctor} prescribed a mouth rinse after my surgery and I'm almost out.",
            "It's the chlorhexidine one. My pharmacy is on {street} Street.",
            "Also the stitches feel a bit loose, is that normal?",
        ],
        [
            "I'll ask {doctor} to approve the refill today.",
            "Loose stitches in the second week are normal; they dissolve on their own.",
            "The refill will be sent to the pharmacy on {street} Street.",
        ],
    ),
    "braces": (
        "Braces consultation",
        [
            "We're thinking about braces for my {relation} {kid}, who is twelve.",
            "How much does it cost, roughly, and does {insurer} pay part of it?",
            "Are the clear aligners an option instead of metal braces?",
        ],
        [
            "{doctor} does a free orthodontic consultation, about thirty minutes.",
            "Treatment usually runs {amount}0 dollars; {insurer} often covers a share.",
            "Aligners are an option for many teens; {doctor} will check at the visit.",
        ],
    ),
    "whitening": (
        "Whitening price",
        [
            "What do you charge for teeth whitening?",
            "Is the in-office one better than the take-home trays?",
            "My wedding is in {month2}, is there enough time?",
        ],
        [
            "In-office whitening is {amount}0 dollars, trays are less.",
            "In-office is faster; trays take about two weeks.",
            "Congratulations! {month2} leaves plenty of time.",
        ],
    ),
    "cancel": (
        "Cancellation",
        [
            "I have to cancel my appointment on {day}, I have the flu.",
            "I'll call back when I'm better to book again.",
        ],
        [
            "No problem, I hope you feel better soon. The {day} visit is cancelled.",
            "There's no late-cancellation fee when you're ill.",
        ],
    ),
    "results": (
        "X-ray results",
        [
            "I'm calling about the x-rays {doctor} took on {day}.",
            "Was there a cavity? {doctor} mentioned a shadow on a molar.",
            "If I need a filling, can it be done before {month2}?",
        ],
        [
            "{doctor} reviewed them: one small cavity on the lower left molar.",
            "A filling takes about forty minutes; {day2} at {time2} is free.",
            "I've noted that you prefer afternoon appointments.",
        ],
    ),
}
CLOSINGS_CALLER = [
    "Great, thank you so much.",
    "Perfect, and please call me after {time}, I'm at work until then.",
    "Thanks, that's all for today.",
]
CLOSINGS_AGENT = ["Have a great day, {first}!", "You're welcome, {first}. Take care!"]
SEARCH_WORDS = {
    "reschedule": ["move appointment {day}", "reminder text", "{doctor} appointment"],
    "toothache": ["{kid} sore tooth", "pain swollen gum", "emergency slot {kid}"],
    "billing": ["bill insurance x-ray", "pay in two parts", "itemized invoice"],
    "insurance": ["new insurance {insurer}", "member number plan", "cleaning covered"],
    "new_patient": ["records old dentist {city}", "new patient check-up", "{kid} check-up"],
    "refill": ["mouth rinse refill", "stitches loose", "pharmacy {street}"],
    "braces": ["braces cost {kid}", "clear aligners", "orthodontic consultation"],
    "whitening": ["whitening price", "wedding {month2}", "take-home trays"],
    "cancel": ["cancel flu", "cancelled appointment {day}"],
    "results": ["x-ray cavity molar", "filling before {month2}", "afternoon appointments"],
}
CITIES = ["Oakland", "Fresno", "Denver", "Austin", "Portland", "Boston", "Tucson", "Madison"]
STREETS = ["Elm", "Oak", "Maple", "Cedar", "Pine", "Market", "Mission", "Valencia"]

TURN_FIELDS = {  # every turn carries these in real deliveries (see the fixture)
    "tool_calls": [],
    "tool_results": [],
    "feedback": None,
    "llm_override": None,
    "conversation_turn_metrics": None,
    "rag_retrieval_info": None,
    "llm_usage": None,
    "interrupted": False,
    "original_message": None,
}


@dataclass(frozen=True, slots=True)
class Caller:
    number: str
    name: str
    relation: str
    kid: str
    city: str
    street: str


def make_callers(rng: random.Random, count: int) -> list[Caller]:
    area_codes = ["212", "312", "415", "503", "617", "646", "702", "718", "206", "305"]
    numbers: set[str] = set()
    callers = []
    while len(callers) < count:
        raw = f"+1{rng.choice(area_codes)}{rng.randint(201, 989)}{rng.randint(0, 9999):04d}"
        if raw in numbers or normalize_caller_id(raw) != raw:
            continue
        numbers.add(raw)
        callers.append(
            Caller(
                number=raw,
                name=f"{rng.choice(FIRST)} {rng.choice(LAST)}",
                relation=rng.choice(RELATIONS),
                kid=rng.choice(KIDS),
                city=rng.choice(CITIES),
                street=rng.choice(STREETS),
            )
        )
    return callers


def _slots(rng: random.Random, caller: Caller) -> dict[str, str]:
    day, day2 = rng.sample(DAYS, 2)
    return {
        "first": caller.name.split()[0],
        "relation": caller.relation,
        "kid": caller.kid,
        "city": caller.city,
        "street": caller.street,
        "day": day,
        "day2": day2,
        "time": rng.choice(TIMES),
        "time2": rng.choice(TIMES),
        "doctor": rng.choice(DOCTORS),
        "insurer": rng.choice(INSURERS),
        "month": rng.choice(MONTHS),
        "month2": rng.choice(MONTHS),
        "amount": str(rng.randint(40, 900)),
        "code": f"{rng.randint(100, 999)}",
        "what": rng.choice(["cleaning", "check-up", "filling", "crown"]),
    }


def make_call(
    template: dict[str, Any],
    rng: random.Random,
    caller: Caller,
    conversation_id: str,
    started_at: int,
) -> tuple[dict[str, Any], str]:
    """One post_call_transcription envelope (the fixture's shape) and its topic."""
    topic = rng.choice(list(TOPICS))
    title, caller_lines, agent_lines = TOPICS[topic]
    slots = _slots(rng, caller)
    turn_count = rng.randint(10, 40)
    lines = [
        ("agent", "Thanks for calling Brightside Dental, this is Ava. How can I help you today?"),
        ("user", f"Hi Ava, this is {caller.name}. " + rng.choice(caller_lines).format(**slots)),
    ]
    other_topic = TOPICS[rng.choice(list(TOPICS))]
    while len(lines) < turn_count - 2:
        source = other_topic if rng.random() < 0.2 else TOPICS[topic]
        role = "agent" if lines[-1][0] == "user" else "user"
        pool = source[2] if role == "agent" else source[1]
        lines.append((role, rng.choice(pool).format(**slots)))
    if lines[-1][0] == "agent":
        lines.append(("user", rng.choice(caller_lines).format(**slots)))
    lines.append(("agent", rng.choice(agent_lines).format(**slots)))
    lines.append(("user", rng.choice(CLOSINGS_CALLER).format(**slots)))
    lines.append(("agent", rng.choice(CLOSINGS_AGENT).format(**slots)))
    offset = 0
    transcript = []
    for role, message in lines:
        transcript.append(
            {
                "role": role,
                "message": message,
                **copy.deepcopy(TURN_FIELDS),
                "time_in_call_secs": offset,
                "source_medium": "audio" if role == "user" else None,
            }
        )
        offset += rng.randint(3, 12)
    payload = copy.deepcopy(template)
    payload["event_timestamp"] = started_at + offset + 4
    data = payload["data"]
    data["conversation_id"] = conversation_id
    data["transcript"] = transcript
    data["metadata"]["start_time_unix_secs"] = started_at
    data["metadata"]["accepted_time_unix_secs"] = started_at
    data["metadata"]["call_duration_secs"] = offset
    data["metadata"]["phone_call"]["external_number"] = caller.number
    data["metadata"]["phone_call"]["call_sid"] = f"CA{rng.getrandbits(128):032x}"
    variables = data["conversation_initiation_client_data"]["dynamic_variables"]
    variables["system__caller_id"] = caller.number
    variables["caller_id"] = caller.number
    variables["system__conversation_id"] = conversation_id
    variables["system__call_duration_secs"] = offset
    analysis = data["analysis"]
    analysis["transcript_summary"] = f"{caller.name} called about: {title.lower()}. " + " ".join(
        line.format(**slots) for line in agent_lines[:2]
    )
    analysis["call_summary_title"] = title
    results = analysis["data_collection_results"]
    results["caller_name"]["value"] = caller.name
    results["follow_up"]["value"] = agent_lines[-1].format(**slots) if rng.random() < 0.5 else None
    return payload, topic


def conversation_id(rng: random.Random) -> str:
    return "conv_" + f"{rng.getrandbits(128):032x}"[:26]


def search_query(rng: random.Random, caller: Caller, topic: str) -> str:
    return rng.choice(SEARCH_WORDS[topic]).format(**_slots(rng, caller))


# --------------------------------------------------------------------------------------
# Seeding through the project's own code
# --------------------------------------------------------------------------------------
@dataclass
class Dataset:
    callers: list[Caller]
    topics: dict[str, list[str]]  # caller number -> topics of their stored calls
    last_start: dict[str, int] = field(default_factory=dict)


def settings_for(data_dir: Path) -> Settings:
    values = service_env(data_dir)
    return Settings(_env_file=None, **{k.lower(): v for k, v in values.items()})


def service_env(data_dir: Path) -> dict[str, str]:
    return {
        "SQLITE_PATH": str(data_dir / "memory.sqlite3"),
        "WEBHOOK_STORAGE_PATH": str(data_dir / "webhooks"),
        "WEBHOOK_QUARANTINE_PATH": str(data_dir / "webhooks" / "quarantine"),
        "ELEVENLABS_POST_CALL_HMAC_KEY": HMAC_KEY,
        "ELEVENLABS_CLIENT_DATA_WORKSPACE_SECRET": API_KEY,
        "ELEVENLABS_API_KEY": "",
        "ELEVENLABS_API_BASE_URL": "http://127.0.0.1:9",  # nothing listens: no real API
        "LLM_BASE_URL": "",
        "REDIS_URL": "",
        "LOG_LEVEL": "WARNING",
    }


def build_dataset(callers: int, calls: int, seed: int) -> tuple[Dataset, Iterator[Any]]:
    """The callers, and a generator of (caller, payload) for every seeded call."""
    rng = random.Random(seed)
    people = make_callers(rng, callers)
    dataset = Dataset(callers=people, topics={})
    template = json.loads((FIXTURES / "post_call_transcription.json").read_text())

    def calls_of_everyone() -> Iterator[tuple[Caller, dict[str, Any]]]:
        for index, caller in enumerate(people):
            call_rng = random.Random(f"{seed}:{index}")
            started = START + call_rng.randint(0, 86_400 * 30)
            topics = dataset.topics.setdefault(caller.number, [])
            for _ in range(calls):
                payload, topic = make_call(
                    template, call_rng, caller, conversation_id(call_rng), started
                )
                topics.append(topic)
                yield caller, payload
                started += call_rng.randint(86_400 * 3, 86_400 * 60)
            dataset.last_start[caller.number] = started

    return dataset, calls_of_everyone()


def regenerated_dataset(callers: int, calls: int, seed: int) -> Dataset:
    """The dataset's callers, topics and dates, without a store (for the requests)."""
    dataset, stream = build_dataset(callers, calls, seed)
    for _ in stream:
        pass
    return dataset


async def seed_store(data_dir: Path, callers: int, calls: int, seed: int) -> Dataset:
    """Store every call with the ingestion's own functions, then prepare each caller's
    profile as the post-call hook does (once, after their last call: profiles are derived
    from all stored calls, so the result is the same as after each call) and save their
    search index as the store's upkeep does (the embedded store: PostgreSQL gets a copy
    of it, `PostgresHost.seeded`)."""
    services = Services.build(settings_for(data_dir))
    store = services.store
    agent = json.loads((FIXTURES / "agent.json").read_text())
    await store.put_agent_profile(agent["agent_id"], agent, time.time())
    dataset, stream = build_dataset(callers, calls, seed)
    started = time.monotonic()
    previous: str | None = None
    for done, (_, payload) in enumerate(stream, start=1):
        record = CallRecord.from_payload(payload)
        user_id, memories = services.ingest._memories_of(payload, record)
        await store.add_call(user_id, record, payload, memories)
        services.indexes.changed(user_id)
        if previous not in (None, user_id):
            await services.personalization.prepare_caller(previous)
            await services.upkeep()  # the caller's search index, as the service's upkeep saves it
        previous = user_id
        if done % 5000 == 0:
            rate = done / (time.monotonic() - started)
            print(f"  seeded {done:,}/{callers * calls:,} calls ({rate:,.0f}/s)", flush=True)
    if previous:
        await services.personalization.prepare_caller(previous)
    await services.close()
    with sqlite3.connect(data_dir / "memory.sqlite3") as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return dataset


def store_format() -> str:
    """What a cached store depends on besides the synthetic data: the embedded store's
    schema and the saved search index's format. A change in either seeds a new store.
    PostgreSQL's schema is not in it: a seeded database is copied from the SQLite store
    and brought to the current schema by the service when it starts (its migrations)."""
    return hashlib.sha256(f"{SCHEMA}{INDEX_FORMAT}".encode()).hexdigest()[:8]


def cached_seed(args: argparse.Namespace, callers: int, calls: int) -> Path:
    """The cached seeded SQLite store of this size, seeded first when not cached."""
    name = f"seed{SEED_FORMAT}-{store_format()}-{callers}x{calls}-s{args.seed}.sqlite3"
    cached: Path = args.cache_dir / name
    if not cached.exists():
        print(f"seeding {callers:,} callers x {calls} calls (seed {args.seed}) ...", flush=True)
        with tempfile.TemporaryDirectory(dir=args.cache_dir) as scratch:
            began = time.monotonic()
            asyncio.run(seed_store(Path(scratch), callers, calls, args.seed))
            os.replace(Path(scratch) / "memory.sqlite3", cached)
            print(f"  seeded in {time.monotonic() - began:.0f} s -> {cached}", flush=True)
    return cached


def prepared_store(args: argparse.Namespace, callers: int, calls: int, run_dir: Path) -> None:
    """Copy a cached seeded SQLite store into `run_dir` (seeding it first when not cached)."""
    cached = cached_seed(args, callers, calls)
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, run_dir / "memory.sqlite3")
    os.chmod(run_dir / "memory.sqlite3", 0o600)
    # On the disk before the service starts: the kernel writing back gigabytes of copy
    # during the run would slow every read the service makes (seconds at 100,000 calls).
    with open(run_dir / "memory.sqlite3", "rb") as copy:
        os.fsync(copy.fileno())


# --------------------------------------------------------------------------------------
# PostgreSQL: the tests' throw-away server (kept under --cache-dir with its seeded
# databases), or a server of the user's (--database-url)
# --------------------------------------------------------------------------------------
class PostgresHost:
    """Where the PostgreSQL runs' databases live. A seeded database is kept (the cache)
    and each run gets a copy of it (`CREATE DATABASE ... TEMPLATE`), so a run never sees
    another run's post-call deliveries."""

    def __init__(self, admin_url: str, server: Any = None) -> None:
        self.admin_url = admin_url
        self.server = server  # the throw-away server, stopped by `close`

    @classmethod
    def start(cls, args: argparse.Namespace) -> PostgresHost:
        if args.database_url:
            return cls(args.database_url)
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from postgres_server import PostgresServer

        # Kept under the cache folder: 100,000 seeded calls take many minutes to write.
        server = PostgresServer(root=args.cache_dir / "postgres").start()
        return cls(server.admin_url, server)

    def url(self, database: str) -> str:
        parts = urlsplit(self.admin_url)
        return urlunsplit(parts._replace(path="/" + database))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            cursor = connection.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def exists(self, database: str) -> bool:
        return bool(self.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)))

    def drop(self, database: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')

    def seeded(self, args: argparse.Namespace, callers: int, calls: int) -> str:
        """The name of the seeded database of this size, seeding it when not kept yet."""
        name = f"seed{SEED_FORMAT}_{store_format()}_{callers}x{calls}_s{args.seed}"
        if self.exists(name):
            return name
        partial = name + "_partial"
        self.drop(partial)
        self.execute(f'CREATE DATABASE "{partial}"')
        # Seeding needs no durability per commit (a crash seeds again): a commit then
        # waits for no disk flush. The runs' copies are reset to the server's default.
        self.execute(f'ALTER DATABASE "{partial}" SET synchronous_commit = off')
        # Copied from the seeded SQLite store by `elaoms migrate --to postgres`'s own code
        # (minutes at 100,000 calls, where storing each call anew took an hour): the way
        # a user of the embedded store moves, and the same calls, profiles and indexes.
        source = cached_seed(args, callers, calls)
        print(f"copying {source.name} into PostgreSQL ...", flush=True)
        began = time.monotonic()
        from elaoms.crypto import PayloadCipher
        from elaoms.memory.transfer import StoreMigration

        report = StoreMigration(source, self.url(partial), PayloadCipher()).run()
        if not report.verified:
            raise SystemExit(f"the copy into PostgreSQL does not match: {report.as_dict()}")
        self.execute(f'ALTER DATABASE "{partial}" RESET synchronous_commit')
        import psycopg

        with psycopg.connect(self.url(partial), autocommit=True) as connection:
            connection.execute("VACUUM (ANALYZE)")  # the planner's statistics, as autovacuum
        self.execute(f'ALTER DATABASE "{partial}" RENAME TO "{name}"')
        print(f"  seeded in {time.monotonic() - began:.0f} s -> database {name}", flush=True)
        return name

    def copy(self, template: str, name: str) -> str:
        """A fresh copy of `template` named `name`; its URL."""
        self.drop(name)
        self.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.url(name)

    def server_cpu_seconds(self) -> float:
        """CPU used so far by the throw-away server's processes (0 for a server of the
        user's, not on this machine as far as we know)."""
        if self.server is None or self.server.process is None:
            return 0.0
        total = 0.0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            postmaster = self.server.process.pid
            # The postmaster and its children (each in a session of its own: no group).
            if int(fields[1]) == postmaster or stat.parent.name == str(postmaster):
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()  # a fast shutdown: kept for the next run


# --------------------------------------------------------------------------------------
# Servers and the client
# --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def gunicorn(
    app: str, cwd: Path, env: dict[str, str], log: Path, workers: int = 1
) -> Iterator[tuple[str, tuple[int, ...]]]:
    """`gunicorn <app> -w <workers> -k uvicorn.workers.UvicornWorker -b 127.0.0.1:PORT`,
    with the repository's gunicorn.conf.py; yields (url, the workers' pids) once every
    worker is up."""
    port = free_port()
    command = [
        str(Path(sys.executable).with_name("gunicorn")),
        app,
        "-c",
        str(REPO_ROOT / "gunicorn.conf.py"),
        "-w",
        str(workers),
        "-k",
        "uvicorn.workers.UvicornWorker",
        "-b",
        f"127.0.0.1:{port}",
    ]
    full_env = {**USER_ENVIRONMENT, **env}
    with open(log, "ab") as output:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=full_env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{app} exited early:\n{log.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{app} did not start:\n{log.read_text(errors='replace')}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if sock.recv(64).startswith(b"HTTP/1.1 200"):
                        break
            except OSError:
                pass
            time.sleep(0.2)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
        while len(children.read_text().split()) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{app}: fewer than {workers} workers started")
            time.sleep(0.2)
        yield url, tuple(int(pid) for pid in children.read_text().split())
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def proc_status(pid: int, field_name: str) -> int:
    """A /proc/<pid>/status figure in kB (VmHWM: peak resident set; VmRSS: now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pids: Sequence[int]) -> float:
    """User and system CPU of these processes, in seconds."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


WRK_SCRIPT = r"""
-- args: path, requests file (signature TAB body per line), api key or "-", mode, ids file
local reqs, n, i, once, ids = {}, 0, 0, false, nil
statuses, received, queued, sent, exhausted, late = {}, 0, 0, 0, 0, 0
threads = {}

function setup(thread) table.insert(threads, thread) end

function init(args)
  local path, key = args[1], args[3]
  once = args[4] == "once"
  if args[5] and args[5] ~= "-" then ids = io.open(args[5], "w"); ids:setvbuf("line") end
  for line in io.lines(args[2]) do
    local sig, body = line:match("^([^\t]*)\t(.*)$")
    local headers = {["Content-Type"] = "application/json"}
    if key ~= "-" then headers["X-Api-Key"] = key end
    if sig ~= "-" then headers["ElevenLabs-Signature"] = sig end
    n = n + 1
    reqs[n] = wrk.format("POST", path, headers, body)
  end
end

function request()
  i = i + 1
  if i > n then
    if once then exhausted = 1; wrk.thread:stop(); return wrk.format("GET", "/health") end
    i = 1
  end
  sent = sent + 1
  return reqs[i]
end

function response(status, headers, body)
  statuses[tostring(status)] = (statuses[tostring(status)] or 0) + 1
  -- A search answered empty at its deadline is a 200, and a failure all the same.
  if body:find('"timed_out":true', 1, true) then late = late + 1 end
  if ids then
    if body:find('"received"', 1, true) then
      received = received + 1
      local id = body:match('"memory_id":"([%w_]+)"')
      if id then ids:write(id, "\n") end
    elseif body:find('"queued"', 1, true) then
      queued = queued + 1
    end
  end
end

function done(summary, latency, requests)
  local t = threads[1]
  local parts = {}
  for code, count in pairs(t:get("statuses")) do
    table.insert(parts, string.format('"%s":%d', code, count))
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%f,' ..
    '"received":%d,"queued":%d,"sent":%d,"exhausted":%d,"late":%d,"statuses":{%s}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean, t:get("received"), t:get("queued"), t:get("sent"), t:get("exhausted"), t:get("late"),
    table.concat(parts, ",")))
end
"""


@dataclass
class Result:
    name: str
    rps: float
    p50: float
    p90: float
    p99: float
    max: float
    requests: int
    errors: int
    statuses: dict[str, int]
    server_cpu: float  # share of one core the workers used during the run (added up)
    accepted: int = 0
    received: int = 0
    queued: int = 0
    sent: int = 0
    exhausted: bool = False
    db_cpu: float = 0.0  # share of one core the throw-away PostgreSQL used during the run


def run_wrk(
    name: str,
    url: str,
    path: str,
    lines: list[str],
    work: Path,
    *,
    args: argparse.Namespace,
    workers: Sequence[int],
    key: str = "-",
    once: bool = False,
    duration: float | None = None,
    connections: int | None = None,
    profile: bool = True,
) -> Result:
    """`wrk -t1 -c<connections> -d<duration>` over the prepared requests (connections:
    --concurrency unless given)."""
    requests_file = work / f"{name}.requests"
    requests_file.write_text("\n".join(lines) + "\n")
    ids_file = work / f"{name}.ids" if once else None
    script = work / "load.lua"
    script.write_text(WRK_SCRIPT)
    seconds = duration or args.duration
    command = [
        args.wrk,
        "-t1",
        f"-c{connections or args.concurrency}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url + path,
        "--",
        path,
        str(requests_file),
        key,
        "once" if once else "cycle",
        str(ids_file or "-"),
    ]
    profiler = None
    if args.py_spy and profile and name not in ("warm", "post-warm"):
        args.py_spy.mkdir(parents=True, exist_ok=True)
        output = args.py_spy / f"{args.size_label}-{name.replace(' ', '-')}.txt"
        profiler = subprocess.Popen(
            [str(Path(sys.executable).with_name("py-spy")), "record", "--format", "raw",
             "--nonblocking", "-r", "200", "-d", str(max(1, round(seconds))), "-p", str(workers[0]),
             "-o", str(output)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    cpu_before, began = cpu_seconds(workers), time.monotonic()
    completed = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if profiler is not None:
        profiler.wait(60)
    cpu_share = (cpu_seconds(workers) - cpu_before) / (time.monotonic() - began)
    marker = [line for line in completed.stdout.splitlines() if line.startswith("WRKJSON ")]
    if completed.returncode != 0 or not marker:
        raise RuntimeError(f"wrk failed:\n{completed.stdout}\n{completed.stderr}")
    raw = json.loads(marker[0].removeprefix("WRKJSON "))
    elapsed = raw["duration_us"] / 1e6
    socket_errors = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    result = Result(
        name=name,
        rps=raw["requests"] / elapsed,
        p50=raw["p50"] / 1000,
        p90=raw["p90"] / 1000,
        p99=raw["p99"] / 1000,
        max=raw["max"] / 1000,
        requests=raw["requests"],
        errors=socket_errors + raw["status"] + raw["late"],
        statuses=raw["statuses"],
        server_cpu=cpu_share,
        received=raw["received"],
        queued=raw["queued"],
        sent=raw["sent"],
        exhausted=bool(raw["exhausted"]),
    )
    if once:
        result.accepted = result.received + result.queued
        result.rps = result.accepted / elapsed
    return result


def client_data_lines(
    rng: random.Random, numbers: list[str], count: int, *, each_once: bool = False
) -> list[str]:
    """Known callers at random; with `each_once`, each number once (strangers call once)."""
    agent = json.loads((FIXTURES / "client_data_request.json").read_text())["agent_id"]
    lines = []
    for index in range(count):
        body = {
            "caller_id": numbers[index % len(numbers)] if each_once else rng.choice(numbers),
            "agent_id": agent,
            "called_number": "+14155550199",
            "call_sid": f"CA{rng.getrandbits(128):032x}",
        }
        lines.append("-\t" + json.dumps(body))
    return lines


def unknown_numbers(rng: random.Random, known: set[str], count: int) -> list[str]:
    numbers: dict[str, None] = {}
    while len(numbers) < count:
        raw = f"+1{rng.choice(['202', '404', '512', '720'])}{rng.randint(201, 989)}"
        raw += f"{rng.randint(0, 9999):04d}"
        if raw not in known and raw not in numbers and normalize_caller_id(raw) == raw:
            numbers[raw] = None
    return list(numbers)


def search_lines(rng: random.Random, dataset: Dataset, count: int) -> list[str]:
    lines = []
    for _ in range(count):
        caller = rng.choice(dataset.callers)
        query = search_query(rng, caller, rng.choice(dataset.topics[caller.number]))
        body = {"query": query, "user_id": caller.number, "limit": 5}
        lines.append("-\t" + json.dumps(body))
    return lines


def post_call_lines(
    rng: random.Random, dataset: Dataset, count: int, tag: str
) -> tuple[list[str], list[str]]:
    """Signed deliveries of new calls by known callers; returns (lines, conversation ids)."""
    template = json.loads((FIXTURES / "post_call_transcription.json").read_text())
    lines, ids = [], []
    for number in range(count):
        caller = rng.choice(dataset.callers)
        started = dataset.last_start[caller.number] + number
        conversation = f"conv_{tag}{number:07d}_{rng.getrandbits(40):010x}"
        payload, _ = make_call(template, rng, caller, conversation, started)
        body = json.dumps(payload, separators=(",", ":"))
        lines.append(sign(HMAC_KEY, body.encode()) + "\t" + body)
        ids.append(conversation)
    return lines, ids


# --------------------------------------------------------------------------------------
# One run at one size
# --------------------------------------------------------------------------------------
@dataclass
class Run:
    stored_calls: int
    callers: int
    backend: str  # sqlite | postgres
    replicas: int  # service replicas driven at once (each its own gunicorn and data folder)
    results: list[Result]
    worker_hwm_mb: float  # the largest of the replicas' workers
    master_hwm_mb: float
    worker_rss_after_start_mb: float
    verified: str
    all_stored: bool

    @property
    def label(self) -> str:
        return self.backend if self.replicas == 1 else f"{self.backend} x{self.replicas}"


@dataclass
class Replica:
    url: str
    workers: tuple[int, ...]  # pids
    data_dir: Path


class StoreProbe:
    """Read-only questions about the store after a run: the embedded file, or the run's
    PostgreSQL database."""

    def __init__(self, *, sqlite_path: Path | None = None, database_url: str = "") -> None:
        self.sqlite_path = sqlite_path
        self.database_url = database_url

    def _count(self, sqlite_query: str, postgres_query: str, ids: list[str]) -> int:
        if self.sqlite_path is None:
            import psycopg

            with psycopg.connect(self.database_url, autocommit=True) as connection:
                row = connection.execute(postgres_query, (ids,)).fetchone()
            return int(row[0]) if row else 0
        uri = f"file:{self.sqlite_path}?mode=ro"
        with sqlite3.connect(uri, uri=True) as db:
            db.execute("CREATE TEMP TABLE ids (id TEXT PRIMARY KEY)")
            db.executemany("INSERT OR IGNORE INTO ids VALUES (?)", [(i,) for i in ids])
            db.commit()  # the query below then reads afresh, not this insert's snapshot
            return int(db.execute(sqlite_query).fetchone()[0])

    def callers_behind(self, conversation_ids: list[str]) -> int:
        """Callers of `conversation_ids` whose saved search index misses some memory."""
        touched = "SELECT DISTINCT user_id FROM calls WHERE conversation_id {}"
        behind = """
            WITH touched AS ({touched})
            SELECT count(*) FROM touched LEFT JOIN caller_indexes USING (user_id)
            WHERE coalesce(caller_indexes.memories, -1)
                != (SELECT count(*) FROM memories WHERE memories.user_id = touched.user_id)
        """
        return self._count(
            behind.format(touched=touched.format("IN (SELECT id FROM ids)")),
            behind.format(touched=touched.format("= ANY(%s)")),
            conversation_ids,
        )

    def calls_stored(self, conversation_ids: list[str]) -> int:
        return self._count(
            "SELECT count(*) FROM calls WHERE conversation_id IN (SELECT id FROM ids)",
            "SELECT count(*) FROM calls WHERE conversation_id = ANY(%s)",
            conversation_ids,
        )

    def memory_ids_found(self, memory_ids: list[str]) -> int:
        return self._count(
            "SELECT count(*) FROM calls WHERE memory_id IN (SELECT id FROM ids)",
            "SELECT count(*) FROM calls WHERE memory_id = ANY(%s)",
            memory_ids,
        )


def wait_for_pending(data_dir: Path, timeout: float = 120.0) -> int:
    pending = data_dir / "webhooks" / "_pending"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = len(list(pending.iterdir())) if pending.exists() else 0
        if left == 0:
            return 0
        time.sleep(0.5)
    return len(list(pending.iterdir()))


def wait_for_indexes(probe: StoreProbe, conversation_ids: list[str], timeout: float = 60.0) -> int:
    """Wait until the saved search index of every caller of `conversation_ids` covers all
    their memories (the service saves them in the background); return how many do not."""
    deadline = time.monotonic() + timeout
    while (behind := probe.callers_behind(conversation_ids)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return behind


def merged(results: list[Result]) -> Result:
    """One endpoint's figures over the replicas driven at once: requests and rates add
    up; each latency is the worst replica's (wrk reports percentiles, which do not merge,
    so this is an upper bound)."""
    if len(results) == 1:
        return results[0]
    statuses: dict[str, int] = {}
    for result in results:
        for code, count in result.statuses.items():
            statuses[code] = statuses.get(code, 0) + count
    return Result(
        name=results[0].name,
        rps=sum(r.rps for r in results),
        p50=max(r.p50 for r in results),
        p90=max(r.p90 for r in results),
        p99=max(r.p99 for r in results),
        max=max(r.max for r in results),
        requests=sum(r.requests for r in results),
        errors=sum(r.errors for r in results),
        statuses=statuses,
        server_cpu=sum(r.server_cpu for r in results),
        accepted=sum(r.accepted for r in results),
        received=sum(r.received for r in results),
        queued=sum(r.queued for r in results),
        sent=sum(r.sent for r in results),
        exhausted=any(r.exhausted for r in results),
    )


class Driver:
    """Drives every replica at once: replica i gets every n-th prepared request (from the
    i-th) and 1/n of the connections, so the offered load is the single replica's, split
    evenly. Each replica has its own wrk (one thread each)."""

    def __init__(
        self, args: argparse.Namespace, replicas: list[Replica], host: PostgresHost | None
    ) -> None:
        self.args = args
        self.replicas = replicas
        self.host = host

    def run(
        self, name: str, path: str, lines: list[str], *, key: str = "-", once: bool = False,
        duration: float | None = None,
    ) -> tuple[Result, list[list[int]], list[Result]]:  # fmt: skip
        """The merged result, for each replica the indexes (into `lines`) it was given,
        and each replica's own result."""
        count = len(self.replicas)
        shares = [list(range(i, len(lines), count)) for i in range(count)]
        connections = max(1, self.args.concurrency // count)
        db_before = self.host.server_cpu_seconds() if self.host else 0.0
        began = time.monotonic()
        with ThreadPoolExecutor(count) as pool:
            futures = [
                pool.submit(
                    run_wrk, name, replica.url, path, [lines[j] for j in share],
                    replica.data_dir, args=self.args, workers=replica.workers, key=key,
                    once=once, duration=duration, connections=connections, profile=number == 0,
                )
                for number, (replica, share) in enumerate(zip(self.replicas, shares, strict=True))
            ]  # fmt: skip
            parts = [future.result() for future in futures]
            result = merged(parts)
        if self.host and self.host.server is not None:
            result.db_cpu = (self.host.server_cpu_seconds() - db_before) / (
                time.monotonic() - began
            )
        return result, shares, parts


def run_size(
    args: argparse.Namespace, callers: int, calls: int, host: PostgresHost | None
) -> list[Run]:
    """Every backend (and replica count) asked for, at one size, after the floor."""
    with tempfile.TemporaryDirectory(prefix="elaoms-load-", dir=args.work_dir) as scratch:
        work = Path(scratch)
        dataset = regenerated_dataset(callers, calls, args.seed)
        rng = random.Random(f"{args.seed}:floor")
        numbers = [caller.number for caller in dataset.callers]
        ok = dict(args=args)
        warm = min(2.0, args.duration)
        args.size_label = f"{callers * calls}"

        print(f"\n== {callers * calls:,} stored calls ({callers:,} callers x {calls})", flush=True)
        # The floor: same command, same client, same concurrency, same size of request.
        floor_lines = client_data_lines(rng, numbers, 2000)
        floor_dir = work / "floor"
        floor_dir.mkdir()
        with gunicorn(
            "floor_app:app",
            BENCH_DIR,
            {"PYTHONPATH": str(BENCH_DIR)},
            floor_dir / "floor.log",
            args.workers,
        ) as (url, workers):
            run_wrk(
                "warm", url, "/floor", floor_lines, floor_dir, workers=workers, duration=warm, **ok
            )
            floor = run_wrk("floor", url, "/floor", floor_lines, floor_dir, workers=workers, **ok)
            print_result(floor, None)
        args.log_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(floor_dir / "floor.log", args.log_dir / f"{args.size_label}-floor.log")

        runs = []
        for backend in args.backends:
            for replicas in args.replica_counts if backend == "postgres" else [1]:
                runs.append(
                    run_backend(
                        args, dataset, calls, floor, backend, replicas, work / f"{backend}-{replicas}", host
                    )
                )  # fmt: skip
        return runs


def run_backend(
    args: argparse.Namespace,
    dataset: Dataset,
    calls: int,
    floor: Result,
    backend: str,
    replicas: int,
    work: Path,
    host: PostgresHost | None,
) -> Run:
    callers = len(dataset.callers)
    # The requests are the same for every backend of a size: the same seed.
    rng = random.Random(f"{args.seed}:requests")
    numbers = [caller.number for caller in dataset.callers]
    warm = min(2.0, args.duration)
    label = backend if replicas == 1 else f"{backend} x{replicas}"
    args.size_label = f"{callers * calls}-{backend}" + ("" if replicas == 1 else f"-x{replicas}")
    dirs = [work / f"replica-{number + 1}" for number in range(replicas)]
    backend_env = {"MEMORY_BACKEND": backend}
    if backend == "sqlite":
        prepared_store(args, callers, calls, dirs[0])
        probe = StoreProbe(sqlite_path=dirs[0] / "memory.sqlite3")
    else:
        assert host is not None
        template = host.seeded(args, callers, calls)
        database_url = host.copy(template, f"run_{callers}x{calls}")
        backend_env["DATABASE_URL"] = database_url
        probe = StoreProbe(database_url=database_url)
    per_replica = max(1, args.workers // replicas) if args.split_workers else args.workers
    how = ""
    if replicas > 1:
        how = (
            f", {per_replica} worker{'s' * (per_replica > 1)} each,"
            " each request to one replica in turn, connections split evenly"
        )
    print(f"\n  -- {label} ({replicas} service replica{'s' * (replicas > 1)}{how})", flush=True)
    with ExitStack() as stack:
        servers = []
        for directory in dirs:
            directory.mkdir(parents=True, exist_ok=True)
            env = {
                **service_env(directory),
                **backend_env,
                "PYTHONPATH": str(REPO_ROOT),
                **dict(args.env),
            }
            url, workers = stack.enter_context(
                gunicorn("main:app", directory, env, directory / "service.log", per_replica)
            )
            servers.append(Replica(url, workers, directory))
        driver = Driver(args, servers, host if backend == "postgres" else None)
        pids = [pid for server in servers for pid in server.workers]
        rss_start = max(proc_status(pid, "VmRSS") for pid in pids) / 1024
        known = client_data_lines(rng, numbers, 20000)
        strangers = unknown_numbers(rng, set(numbers), 40000)
        unknown = client_data_lines(rng, strangers[:30000], 30000, each_once=True)
        searches = search_lines(rng, dataset, 20000)
        results = [floor]
        driver.run("warm", "/webhooks/client-data", known, key=API_KEY, duration=warm)
        phases = [
            ("client-data known", "/webhooks/client-data", known),
            ("client-data unknown", "/webhooks/client-data", unknown),
            ("search-data", "/webhooks/search-data", searches),
        ]
        phases = [phase for phase in phases if phase[1].rsplit("/", 1)[1] in args.only]
        warm_lines = {
            "client-data unknown": client_data_lines(rng, strangers[30000:], 10000, each_once=True)
        }
        for name, path, lines in phases:
            driver.run("warm", path, warm_lines.get(name, lines[::-1]), key=API_KEY, duration=warm)
            results.append(driver.run(name, path, lines, key=API_KEY)[0])
            print_result(results[-1], floor)

        if "post-call" in args.only:
            post = drive_post_calls(args, dataset, rng, driver, probe, warm, floor)
            results.append(post.result)
        hwm = max(proc_status(pid, "VmHWM") for pid in pids) / 1024
        master = Path(f"/proc/{pids[0]}/stat").read_text().rsplit(")", 1)[1].split()[1]
        master_hwm = proc_status(int(master), "VmHWM") / 1024

    for number, directory in enumerate(dirs, start=1):
        shutil.copyfile(
            directory / "service.log", args.log_dir / f"{args.size_label}-{number}-service.log"
        )
    verified, all_stored = "not driven", True
    if "post-call" in args.only:
        verified, all_stored = verify_post_calls(dirs, probe, post)
        print(f"  post-call check: {verified}", flush=True)
        print(f"  index upkeep: {post.upkeep}", flush=True)
    print(f"  server worker peak memory (VmHWM): {hwm:.0f} MB", flush=True)
    if backend == "postgres" and host is not None:
        host.drop(f"run_{callers}x{calls}")
    return Run(
        stored_calls=callers * calls,
        callers=callers,
        backend=backend,
        replicas=replicas,
        results=results,
        worker_hwm_mb=hwm,
        master_hwm_mb=master_hwm,
        worker_rss_after_start_mb=rss_start,
        verified=verified,
        all_stored=all_stored,
    )


@dataclass
class PostCalls:
    result: Result
    attempted: list[str]  # conversation ids sent (each replica's share, up to what it sent)
    left_pending: int
    upkeep: str  # how soon every caller's search index was saved


def drive_post_calls(
    args: argparse.Namespace,
    dataset: Dataset,
    rng: random.Random,
    driver: Driver,
    probe: StoreProbe,
    warm: float,
    floor: Result,
) -> PostCalls:
    """Signed deliveries, each sent once, then how long the spool and the index upkeep
    take to catch up."""
    warm_lines, _ = post_call_lines(rng, dataset, 300, "w")
    lines, sent_ids = post_call_lines(rng, dataset, int(args.post_call_max), "m")
    driver.run("post-warm", "/webhooks/post-call", warm_lines, once=True, duration=warm)
    post, shares, parts = driver.run("post-call", "/webhooks/post-call", lines, once=True)
    print_result(post, floor)
    post_ended = time.monotonic()
    left = sum(wait_for_pending(replica.data_dir) for replica in driver.replicas)
    attempted: list[str] = []
    for share, part in zip(shares, parts, strict=True):
        attempted += [sent_ids[index] for index in share[: part.sent]]
    behind = wait_for_indexes(probe, attempted)
    upkeep = (
        f"the search indexes of every caller called caught up"
        f" {time.monotonic() - post_ended:.1f} s after the last delivery"
        if behind == 0
        else f"{behind} callers' search indexes STILL BEHIND"
    )
    return PostCalls(post, attempted, left, upkeep)


def verify_post_calls(dirs: list[Path], probe: StoreProbe, post: PostCalls) -> tuple[str, bool]:
    """Every delivery answered `received` has its memory id in the store, and at least as
    many of the sent conversations are stored as were accepted (`queued` ones included)."""
    memory_ids = sorted(
        {i for directory in dirs for i in (directory / "post-call.ids").read_text().split()}
    )
    stored = probe.calls_stored(post.attempted)
    found = probe.memory_ids_found(memory_ids)
    result = post.result
    all_stored = found == len(memory_ids) and stored >= result.accepted and post.left_pending == 0
    text = (
        f"{result.accepted:,} accepted ({result.received:,} received, {result.queued:,} queued), "
        f"{len(post.attempted):,} sent, {stored:,} of the sent calls in the store, "
        f"{found:,}/{len(memory_ids):,} answered memory ids found, {post.left_pending} pending"
        f" -> {'every accepted delivery stored' if all_stored else 'MISSING DELIVERIES'}"
    )
    return text, all_stored


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------
HEADER = (
    f"  {'endpoint':<20} {'rps':>7} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}"
    f" {'errors':>6} {'cpu':>5} {'db cpu':>6} {'p99/floor':>9} {'rps/floor':>9}"
)


def print_result(result: Result, floor: Result | None) -> None:
    if floor is None:
        print(HEADER)
    ratio_p99 = f"{result.p99 / floor.p99:.1f}x" if floor else "1.0x"
    ratio_rps = f"{result.rps / floor.rps:.2f}" if floor else "1.00"
    db_cpu = f"{result.db_cpu:.0%}" if result.db_cpu else "-"
    print(
        f"  {result.name:<20} {result.rps:>7.0f} {result.p50:>6.1f}m {result.p90:>6.1f}m"
        f" {result.p99:>6.1f}m {result.max:>6.0f}m {result.errors:>6} {result.server_cpu:>4.0%}"
        f" {db_cpu:>6} {ratio_p99:>9} {ratio_rps:>9}",
        flush=True,
    )
    if result.exhausted:
        print("    (every prepared request was sent before the end: raise --post-call-max)")


def targets(run: Run, embedded: Run | None = None) -> list[tuple[str, bool]]:
    """The issue's targets; for PostgreSQL, `embedded` (the SQLite run of the same size,
    same invocation) gives the ratios."""
    by = {result.name: result for result in run.results}
    floor = by["floor"]
    sqlite = {result.name: result for result in embedded.results} if embedded else {}
    checks = []
    if known := by.get("client-data known"):
        checks += [
            (f"client-data p99 {known.p99:.1f} ms < 15 ms", known.p99 < 15),
            (
                f"client-data p99 within 3x of the floor's ({known.p99 / floor.p99:.1f}x)",
                known.p99 <= 3 * floor.p99,
            ),
        ]
    if search := by.get("search-data"):
        checks.append((f"search p99 {search.p99:.1f} ms < 40 ms", search.p99 < 40))
    for name in ("client-data known", "client-data unknown", "search-data"):
        if name in by and name in sqlite:
            ratio = by[name].p99 / sqlite[name].p99
            checks.append((f"{name} p99 within 1.5x of SQLite's ({ratio:.2f}x)", ratio <= 1.5))
    if post := by.get("post-call"):
        checks += [
            (f"post-call {post.rps:.0f} accepted/s >= 300", post.rps >= 300),
            ("every accepted post-call delivery stored", run.all_stored),
        ]
    if run.stored_calls >= 100_000 or embedded is not None:
        checks.append(
            (f"worker peak memory {run.worker_hwm_mb:.0f} MB < 400 MB", run.worker_hwm_mb < 400)
        )
    return checks


def cpu_ms(result: Result) -> float:
    """Milliseconds of the service workers' CPU per request (per accepted delivery)."""
    return result.server_cpu * 1000 / result.rps if result.rps else 0.0


def print_summary(runs: list[Run]) -> None:
    for run in runs:
        embedded = next(
            (
                other
                for other in runs
                if other.backend == "sqlite"
                and other.stored_calls == run.stored_calls
                and run.backend != "sqlite"
            ),
            None,
        )
        print(f"\n{run.stored_calls:,} stored calls, {run.label}: targets")
        for text, met in targets(run, embedded):
            print(f"  [{'met' if met else 'NOT MET'}] {text}")
    for size in sorted({run.stored_calls for run in runs}):
        same = [run for run in runs if run.stored_calls == size]
        base = next((run for run in same if run.backend == "sqlite"), None)
        if base is None or len(same) < 2:
            continue
        print(f"\n{size:,} stored calls: each backend against SQLite (rps, p99 ms, ratio)")
        for run in same:
            if run is base:
                continue
            print(f"  {run.label}")
            for a, b in zip(base.results[1:], run.results[1:], strict=True):
                # CPU per request: what a busy machine changes least (latency and rate
                # follow whatever else runs; the work each request costs does not).
                print(
                    f"    {a.name:<20} rps {a.rps:>7.0f} -> {b.rps:<7.0f} ({b.rps / a.rps:.2f}x)"
                    f"   p99 {a.p99:>6.1f} -> {b.p99:<6.1f} ({b.p99 / a.p99:.2f}x)"
                    f"   worker cpu ms/request {cpu_ms(a):.2f} -> {cpu_ms(b):.2f}"
                    + (f" + db {b.db_cpu * 1000 / b.rps:.2f}" if b.db_cpu and b.rps else "")
                )
            print(
                f"    {'peak memory MB':<20} {base.worker_hwm_mb:>11.0f} -> {run.worker_hwm_mb:.0f}"
            )
    labels = list(dict.fromkeys(run.label for run in runs))
    for label in labels:
        mine = [run for run in runs if run.label == label]
        if len(mine) < 2:
            continue
        first, last = mine[0], mine[-1]
        print(
            f"\n{label}: how each figure moves from {first.stored_calls:,}"
            f" to {last.stored_calls:,} calls"
        )
        print(f"  {'endpoint':<20} {'rps':>16} {'p50 ms':>14} {'p99 ms':>14}")
        for a, b in zip(first.results, last.results, strict=True):
            print(
                f"  {a.name:<20} {a.rps:>7.0f}->{b.rps:<7.0f} {a.p50:>6.1f}->{b.p50:<6.1f}"
                f" {a.p99:>6.1f}->{b.p99:<6.1f}"
            )
        print(f"  {'peak memory MB':<20} {first.worker_hwm_mb:>7.0f}->{last.worker_hwm_mb:<7.0f}")


def machine() -> str:
    cpu = "unknown cpu"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}, load average {load[0]:.2f} at start"
    )


def comma_list(choices: Sequence[str]) -> Any:
    def parse(value: str) -> list[str]:
        items = [item.strip() for item in value.split(",") if item.strip()]
        wrong = [item for item in items if item not in choices]
        if wrong or not items:
            raise argparse.ArgumentTypeError(f"choose among {', '.join(choices)}")
        return list(dict.fromkeys(items))

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--callers", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=10, help="calls per caller")
    parser.add_argument(
        "--scale",
        action="store_true",
        help="run 100 x 10 then 10,000 x 10 calls and show how figures move",
    )
    parser.add_argument(
        "--backend",
        dest="backends",
        type=comma_list(["sqlite", "postgres"]),
        default=["sqlite"],
        help="the memory store(s), measured one after the other in this run:"
        " sqlite, postgres or sqlite,postgres (ratios to SQLite are printed)",
    )
    parser.add_argument(
        "--database-url",
        default="",
        help="PostgreSQL: a server of yours, as the URL of a database to connect to; the"
        " bench creates its own databases there (seeded ones kept as a cache, a copy per run)."
        " Default: the tests' throw-away server, kept under --cache-dir",
    )
    parser.add_argument(
        "--replicas",
        dest="replica_counts",
        type=comma_list(["1", "2"]),
        default=["1"],
        help="PostgreSQL: how many service replicas (own gunicorn, own data folder, one"
        " database) are driven at once; 1,2 measures both",
    )
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument(
        "--seed-only",
        action="store_true",
        help="seed (and cache) the stores of every backend asked for, measure nothing:"
        " two of these at once, one per backend, seed in parallel",
    )
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gunicorn workers of each service replica (and of the floor); their CPU is"
        " added up, their memory is the largest one's",
    )
    parser.add_argument(
        "--split-workers",
        action="store_true",
        help="several replicas share --workers (each gets workers / replicas, at least 1):"
        " on one machine, as many worker processes as the one replica and SQLite have, as"
        " replicas on machines of their own would each have their own cores",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per endpoint")
    parser.add_argument(
        "--post-call-max",
        type=int,
        default=15_000,
        help="signed deliveries prepared: the post-call run sends each once",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=ENDPOINTS,
        help="drive only this endpoint, besides the floor (repeatable; default: all)",
    )
    parser.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "elaoms-bench-seeds"
    )
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "elaoms-bench-logs",
        help="where the servers' logs are kept after the run",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        type=lambda v: v.split("=", 1),
        metavar="NAME=VALUE",
        help="extra setting for the service (repeatable)",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        help="profile the (first) worker during each endpoint's run into this folder"
        " (collapsed stacks; needs `pip install py-spy`)",
    )
    args = parser.parse_args()
    args.only = args.only or ENDPOINTS
    args.replica_counts = [int(count) for count in args.replica_counts]
    if not shutil.which(args.wrk):
        sys.exit("wrk is not installed: apt-get install wrk (see docs/performance.md)")
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    sizes = [(100, 10), (10_000, 10)] if args.scale else [(args.callers, args.calls)]
    print(f"machine: {machine()}")
    print(f"client: wrk -t1 -c{args.concurrency}, {args.duration:g} s per endpoint")
    print(f"service: gunicorn -w {args.workers} per replica (and for the floor)")
    print(f"backends: {', '.join(args.backends)}")
    if args.env:
        print("service settings: " + " ".join(f"{k}={v}" for k, v in args.env))
    host = PostgresHost.start(args) if "postgres" in args.backends else None
    if args.seed_only:
        try:
            for callers, calls in sizes:
                if "sqlite" in args.backends:
                    cached_seed(args, callers, calls)
                if host is not None:
                    host.seeded(args, callers, calls)
        finally:
            if host is not None:
                host.close()
        return
    try:
        runs = [run for callers, calls in sizes for run in run_size(args, callers, calls, host)]
    finally:
        if host is not None:
            host.close()
    print_summary(runs)
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {
                        **{k: v for k, v in vars(run).items() if k != "results"},
                        "results": [vars(result) for result in run.results],
                    }
                    for run in runs
                ],
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
