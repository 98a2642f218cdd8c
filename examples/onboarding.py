"""Customer onboarding as a goal-driven Flow.

Three independent steps overlap; ``complete-onboarding`` starts once all three have
written their outputs, and ``upsell-offer`` never runs because no goal needs it.

    python examples/onboarding.py            # embedded SQLite file, or DURAPIPE_DATABASE_URL
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from durapipe import App, Flow, Step

T0 = time.time()


def _log(step: str, what: str) -> None:
    print(f"  {time.time() - T0:5.2f}s  {what:<6} {step}")


async def generate_documents(state: dict[str, Any]) -> dict[str, Any]:
    _log("generate-documents", "start")
    await asyncio.sleep(0.6)
    _log("generate-documents", "end")
    return {"document_url": f"https://docs.example.com/{state['customer_id']}.pdf"}


async def setup_account(state: dict[str, Any]) -> dict[str, Any]:
    _log("setup-account", "start")
    await asyncio.sleep(0.3)
    _log("setup-account", "end")
    return {"account_id": f"acct-{state['customer_id']}"}


async def send_welcome(state: dict[str, Any]) -> dict[str, Any]:
    _log("send-welcome-email", "start")
    await asyncio.sleep(0.4)
    _log("send-welcome-email", "end")
    return {"email_sent": f"welcome sent to {state['customer_name']} <{state['email']}>"}


def complete(state: dict[str, Any]) -> dict[str, Any]:
    _log("complete-onboarding", "start")
    return {"onboarding_complete": True}


def upsell(state: dict[str, Any]) -> dict[str, Any]:
    raise AssertionError("upsell-offer is not needed by any goal and must not run")


onboarding = Flow(
    goals=["onboarding_complete"],
    steps=[
        Step("generate-documents", generate_documents, needs=["customer_id"], outputs=["document_url"]),
        Step("setup-account", setup_account, needs=["customer_id", "email"], outputs=["account_id"]),
        Step("send-welcome-email", send_welcome, needs=["email", "customer_name"], outputs=["email_sent"]),
        Step("complete-onboarding", complete, needs=["document_url", "account_id", "email_sent"],
             outputs=["onboarding_complete"]),
        Step("upsell-offer", upsell, needs=["account_id"], outputs=["offer"]),
    ],
)

app = App("onboarding")
onboard = app.pipeline("onboard", onboarding, inputs=["customer_id", "email", "customer_name"])


def main() -> None:
    inputs = {"customer_id": "c-42", "email": "ada@example.com", "customer_name": "Ada"}
    plan = onboarding.plan(inputs=list(inputs))
    print("plan:\n" + str(plan) + "\n")
    print("mermaid:\n" + plan.mermaid() + "\n")
    with app:
        global T0
        T0 = time.time()
        print("run:")
        result = onboard.run(inputs)
    print(f"\nresult ({result.status.value}):")
    for key, value in result.state.items():
        print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
