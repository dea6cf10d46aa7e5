"""Notice mail per second through the sender's kept connections, against a connection a message.

The product side sends each message through `notices.mail.MailRelay` (what the sender's workers use:
a connection kept while mail is due); the baseline through `aiosmtplib.send`, a connection a message
(what the sender did before). Both send the same notices' mail, rendered once beforehand (rendering is
the same on both sides and not what is compared), from `--workers` tasks at once, to a Mailpit of the
run: plain SMTP on loopback, and STARTTLS with AUTH required (as a mail relay of a cloud provider
asks), the client trusting a CA of the run. Rounds alternate the two sides; the median round is printed,
with the client's CPU a message. No target in the issue: the ratio is what the relay saves.
Run: `.venv/bin/python bench/mail.py [--messages 1000] [--rounds 3] [--workers 2]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiosmtplib
from machine import print_machine_speed

from iotistic_billing.devenv.mailpit import Mailpit
from iotistic_billing.devenv.pki import CertificateAuthority
from iotistic_billing.notices.mail import MailRelay
from iotistic_billing.notices.render import StoredNotice, email_message

TIMEOUT = 10.0


def messages(count: int) -> list[EmailMessage]:
    now = datetime.now(UTC)
    notice = StoredNotice(
        kind="payment.failed",
        customer_id="cust_bench",
        customer_name="bench",
        subject="Payment failed for Bench Co",
        facts={"lines": ["The payment of invoice in_bench failed."], "plan": "professional"},
        created_at=now,
    )
    return [
        email_message(
            notice,
            sender="billing@iotistic.example",
            to=f"ops{i}@bench.example",
            message_id=f"m-{i}",
            now=now,
        )
        for i in range(count)
    ]


def one_connection_each(url: str) -> Callable[[EmailMessage], Awaitable[object]]:
    parsed = urlsplit(url)

    async def send(message: EmailMessage) -> object:
        return await aiosmtplib.send(
            message,
            hostname=parsed.hostname,
            port=parsed.port,
            username=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
            timeout=TIMEOUT,
        )

    return send


async def timed(
    send: Callable[[EmailMessage], Awaitable[object]], batch: list[EmailMessage], workers: int
) -> tuple[float, float]:
    """Seconds and client CPU seconds to send `batch` from `workers` tasks taking the next message each."""
    queue = iter(batch)

    async def worker() -> None:
        for message in queue:
            await send(message)

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return time.perf_counter() - wall, time.process_time() - cpu


async def compare(url: str, batch: list[EmailMessage], rounds: int, workers: int) -> dict[str, object]:
    kept_runs, each_runs = [], []
    for _ in range(rounds):
        relay = MailRelay(url, TIMEOUT)
        kept_runs.append(await timed(relay.send, batch, workers))
        await relay.close_idle()
        each_runs.append(await timed(one_connection_each(url), batch, workers))
    kept = statistics.median(len(batch) / wall for wall, _ in kept_runs)
    each = statistics.median(len(batch) / wall for wall, _ in each_runs)
    return {
        "kept_per_s": round(kept, 1),
        "connection_each_per_s": round(each, 1),
        "ratio": round(kept / each, 2),
        "kept_cpu_ms": round(statistics.median(cpu for _, cpu in kept_runs) * 1000 / len(batch), 3),
        "connection_each_cpu_ms": round(
            statistics.median(cpu for _, cpu in each_runs) * 1000 / len(batch), 3
        ),
        "rounds_kept_per_s": [round(len(batch) / wall, 1) for wall, _ in kept_runs],
        "rounds_connection_each_per_s": [round(len(batch) / wall, 1) for wall, _ in each_runs],
    }


def arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, read apart from the run: a unit test parses the README's examples with it."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    return parser.parse_args(argv)


def main() -> int:
    args = arguments()
    print_machine_speed()
    batch = messages(args.messages)
    with tempfile.TemporaryDirectory(prefix="bench-mail-") as temporary:
        work = Path(temporary)
        authority = CertificateAuthority("bench-mail-ca")
        server = authority.issue("127.0.0.1", ips=("127.0.0.1",), server=True)
        (work / "ca.pem").write_bytes(authority.cert_pem)
        (work / "smtp.pem").write_bytes(server.cert_pem)
        (work / "smtp.key").write_bytes(server.key_pem)
        os.environ["SSL_CERT_FILE"] = str(work / "ca.pem")  # ssl's default context trusts the run's CA
        (work / "plain").mkdir()
        (work / "tls").mkdir()
        plain = Mailpit(work / "plain").start()
        tls = Mailpit(
            work / "tls",
            (
                f"--smtp-tls-cert={work / 'smtp.pem'}",
                f"--smtp-tls-key={work / 'smtp.key'}",
                "--smtp-require-starttls",
                "--smtp-auth-accept-any",
            ),
        ).start()
        try:
            results = {
                "plain": asyncio.run(compare(plain.smtp_url, batch, args.rounds, args.workers)),
                "starttls_auth": asyncio.run(
                    compare(
                        f"smtp://bench:secret@127.0.0.1:{tls.smtp_port}", batch, args.rounds, args.workers
                    )
                ),
            }
        finally:
            plain.stop()
            tls.stop()
    print(json.dumps({"messages": args.messages, "workers": args.workers, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
