"""Task families: tools (schema + Python implementation over a JSON state) and a seeded
generator of instances.

Every instance needs 2-4 dependent calls: the first turn looks up ids (account ids, skus,
e-mails, ...) that are random per task, later turns pass them on, and the answer quotes a value
only a tool output holds. Every instance changes the state (a transfer, a restock, a new event,
...), so `state_right` is never free.

Language is templated and regular on purpose: the trainer's model has a few million parameters.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diagnose.toolcall import ToolCall

from .base import ToolError, ToolImpl, tool_schema

NAMES = (
    "Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy",
    "Mallory", "Nina", "Oscar", "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter", "Yara",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
ITEMS = ("lamp", "chair", "desk", "mug", "pen", "cable", "kettle", "towel", "fan", "plate", "clock", "rug")
TITLES = ("lunch", "sync", "review", "demo", "call", "standup", "retro", "dinner", "interview", "planning")
DOMAINS = ("mail.com", "corp.org", "inbox.net")
BOOKS = ("Dune", "Emma", "Hamlet", "Walden", "Beloved", "Ulysses", "Dracula", "Persuasion", "Middlemarch", "Kindred")
CITIES = ("Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Berlin", "Madrid", "Dublin", "Quito")
MONTHS = ("March", "April", "May", "June", "July")


@dataclass(frozen=True)
class Instance:
    """What a generator returns; `make_tasks` executes ``gold_turns`` to get the answer."""

    variant: str
    user: str
    state: dict[str, Any]
    gold_turns: list[list[ToolCall]]  # without the final [] turn
    answer: Callable[[list[list[dict[str, Any]]]], tuple[str, str]]  # outputs per turn -> (text, value)


@dataclass(frozen=True)
class Family:
    name: str
    tools: list[dict[str, Any]]
    impls: dict[str, ToolImpl]
    generate: Callable[[random.Random], Instance]


def _c(name: str, /, **arguments: Any) -> ToolCall:
    return ToolCall(name, arguments)


def _ids(rng: random.Random, prefix: str, k: int) -> list[str]:
    return [f"{prefix}-{n}" for n in rng.sample(range(1000, 10000), k)]


def _find(table: dict[str, Any], key: str, value: Any, missing: str) -> str:
    """The id of the row whose ``key`` is ``value``; a tool error saying ``missing`` if none is."""
    found = next((i for i, row in table.items() if row.get(key) == value), None)
    if found is None:
        raise ToolError(missing)
    return found


def _row(table: dict[str, Any], row_id: str, what: str) -> dict[str, Any]:
    """The row ``row_id``; a tool error ``no <what> <row_id>`` if there is none."""
    row = table.get(row_id)
    if row is None:
        raise ToolError(f"no {what} {row_id}")
    return row


def _new_id(state: dict[str, Any], prefix: str, counter: str) -> str:
    """The next id of a created record (``<prefix>-<n>``), counting up ``state[counter]``."""
    new = f"{prefix}-{state[counter]}"
    state[counter] += 1
    return new


def _quote(turn: int, key: str, text: str) -> Callable[[list[list[dict[str, Any]]]], tuple[str, str]]:
    """An instance's answer: the value ``key`` of the first output of turn ``turn``, said in
    ``text`` (``{}`` stands for the value), and that value as the one the answer must contain."""
    def answer(outs: list[list[dict[str, Any]]]) -> tuple[str, str]:
        value = outs[turn][0][key]
        return text.format(value), str(value)

    return answer


# ----------------------------------------------------------------------------------- bank


def _find_account(state, name):
    return {"account_id": _find(state["accounts"], "name", name, f"no account for {name}")}


def _get_balance(state, account_id):
    return {"account_id": account_id, "balance": _row(state["accounts"], account_id, "account")["balance"]}


def _transfer(state, from_id, to_id, amount):
    accounts = state["accounts"]
    for acc in (from_id, to_id):
        if acc not in accounts:
            raise ToolError(f"no account {acc}")
    if from_id == to_id:
        raise ToolError("from_id and to_id are the same account")
    if amount <= 0:
        raise ToolError("amount must be positive")
    if accounts[from_id]["balance"] < amount:
        raise ToolError("insufficient funds")
    accounts[from_id]["balance"] -= amount
    accounts[to_id]["balance"] += amount
    tid = _new_id(state, "tr", "next_transfer")
    state["transfers"].append({"id": tid, "from": from_id, "to": to_id, "amount": amount})
    return {"ok": True, "transfer_id": tid}


BANK_TOOLS = [
    tool_schema("find_account", "Find an account by owner name.", name="string"),
    tool_schema("transfer", "Move money between accounts.", from_id="string", to_id="string", amount="integer"),
    tool_schema("get_balance", "Get an account balance.", account_id="string"),
]


def _gen_bank(rng: random.Random) -> Instance:
    names = rng.sample(NAMES, 4)
    ids = _ids(rng, "acct", 4)
    state = {
        "accounts": {i: {"name": n, "balance": rng.randrange(100, 500, 10)} for i, n in zip(ids, names)},
        "transfers": [],
        "next_transfer": rng.randrange(1000, 9000),
    }
    a, b = names[0], names[1]
    amt = rng.randrange(5, 100, 5)
    finds = [_c("find_account", name=a), _c("find_account", name=b)]
    move = [_c("transfer", from_id=ids[0], to_id=ids[1], amount=amt)]
    if rng.random() < 0.6:
        who, who_id = (a, ids[0]) if rng.random() < 0.5 else (b, ids[1])
        user = rng.choice((
            "Move {amt} dollars from {a} to {b}, then tell me {who}'s balance.",
            "Send {amt} dollars from {a} to {b} and tell me the new balance of {who}.",
        )).format(amt=amt, a=a, b=b, who=who)
        return Instance("transfer_balance", user, state, [finds, move, [_c("get_balance", account_id=who_id)]],
                        _quote(2, "balance", f"{who} now has {{}} dollars."))
    user = rng.choice((
        "Move {amt} dollars from {a} to {b} and give me the transfer id.",
        "Send {amt} dollars from {a} to {b}, then tell me the transfer id.",
    )).format(amt=amt, a=a, b=b)
    return Instance("transfer_id", user, state, [finds, move], _quote(1, "transfer_id", "Done. The transfer id is {}."))


# ------------------------------------------------------------------------------ inventory


def _find_item(state, name):
    return {"sku": _find(state["items"], "name", name, f"no item named {name}")}


def _check_stock(state, sku):
    return {"sku": sku, "quantity": _row(state["items"], sku, "item")["quantity"]}


def _restock(state, sku, quantity):
    item = _row(state["items"], sku, "item")
    if not 0 < quantity <= 1000:
        raise ToolError("quantity must be between 1 and 1000")
    item["quantity"] += quantity
    oid = _new_id(state, "ord", "next_order")
    state["orders"].append({"id": oid, "sku": sku, "quantity": quantity})
    return {"ok": True, "order_id": oid}


INVENTORY_TOOLS = [
    tool_schema("find_item", "Find an item's sku by name.", name="string"),
    tool_schema("check_stock", "Get the quantity in stock.", sku="string"),
    tool_schema("restock", "Add units to stock.", sku="string", quantity="integer"),
]


def _gen_inventory(rng: random.Random) -> Instance:
    items = rng.sample(ITEMS, 4)
    skus = _ids(rng, "sku", 4)
    state = {
        "items": {s: {"name": n, "quantity": rng.randrange(0, 60)} for s, n in zip(skus, items)},
        "orders": [],
        "next_order": rng.randrange(1000, 9000),
    }
    item, sku, qty = items[0], skus[0], rng.randrange(5, 100, 5)
    first = [[_c("find_item", name=item)], [_c("restock", sku=sku, quantity=qty)]]
    if rng.random() < 0.6:
        user = rng.choice((
            "Restock {item} with {qty} units, then tell me how many we have.",
            "Add {qty} units of {item} to stock and tell me the new count.",
        )).format(item=item, qty=qty)
        return Instance("restock_count", user, state, first + [[_c("check_stock", sku=sku)]],
                        _quote(2, "quantity", f"We now have {{}} units of {item}."))
    user = rng.choice((
        "Restock {item} with {qty} units and give me the order id.",
        "Add {qty} units of {item} to stock, then tell me the order id.",
    )).format(item=item, qty=qty)
    return Instance("restock_id", user, state, first, _quote(1, "order_id", "Done. The order id is {}."))


# ------------------------------------------------------------------------------- calendar


def _find_contact(state, name):
    email = state["contacts"].get(name)
    if email is None:
        raise ToolError(f"no contact named {name}")
    return {"email": email}


def _create_event(state, title, day, attendee_email):
    if day not in DAYS:
        raise ToolError(f"unknown day: {day}")
    if attendee_email not in state["contacts"].values():
        raise ToolError(f"unknown attendee: {attendee_email}")
    if not title.strip():
        raise ToolError("title is empty")
    eid = _new_id(state, "ev", "next_event")
    state["events"].append({"id": eid, "title": title, "day": day, "attendee": attendee_email})
    return {"ok": True, "event_id": eid}


def _list_events(state, attendee_email):
    if attendee_email not in state["contacts"].values():
        raise ToolError(f"unknown attendee: {attendee_email}")
    titles = [e["title"] for e in state["events"] if e["attendee"] == attendee_email]
    return {"count": len(titles), "titles": titles}


CALENDAR_TOOLS = [
    tool_schema("find_contact", "Find a contact's email by name.", name="string"),
    tool_schema("create_event", "Add an event to the calendar.", title="string", day="string", attendee_email="string"),
    tool_schema("list_events", "List the events with a contact.", attendee_email="string"),
]


def _gen_calendar(rng: random.Random) -> Instance:
    names = rng.sample(NAMES, 4)
    contacts = {n: f"{n.lower()}{rng.randrange(10, 100)}@{rng.choice(DOMAINS)}" for n in names}
    day = rng.choice(DAYS)
    events = []
    for _ in range(rng.randrange(0, 5)):  # earlier events, some with the same contact
        events.append({
            "id": f"ev-{rng.randrange(100, 1000)}",  # 3 digits: never a new event's id
            "title": rng.choice(TITLES),
            "day": rng.choice(DAYS),
            "attendee": contacts[names[0] if rng.random() < 0.5 else rng.choice(names[1:])],
        })
    state = {"contacts": contacts, "events": events, "next_event": rng.randrange(1000, 9000)}
    name, title = names[0], rng.choice(TITLES)
    first = [[_c("find_contact", name=name)], [_c("create_event", title=title, day=day, attendee_email=contacts[name])]]
    if rng.random() < 0.6:
        user = rng.choice((
            "Book a {title} with {name} on {day}, then tell me how many events I have with {name}.",
            "Schedule a {title} with {name} on {day} and tell me how many events {name} is in.",
        )).format(title=title, name=name, day=day)
        return Instance("event_count", user, state, first + [[_c("list_events", attendee_email=contacts[name])]],
                        _quote(2, "count", f"Events with {name}: {{}}."))
    user = rng.choice((
        "Book a {title} with {name} on {day} and give me the event id.",
        "Schedule a {title} with {name} on {day}, then tell me the event id.",
    )).format(title=title, name=name, day=day)
    return Instance("event_id", user, state, first, _quote(1, "event_id", "Booked. The event id is {}."))


# ------------------------------------------------------------------- library (content OOD)


def _find_book(state, title):
    return {"book_id": _find(state["books"], "title", title, f"no book titled {title}")}


def _find_member(state, name):
    return {"member_id": _find(state["members"], "name", name, f"no member named {name}")}


def _borrow_book(state, book_id, member_id):
    book = _row(state["books"], book_id, "book")
    _row(state["members"], member_id, "member")
    if not book["available"]:
        raise ToolError("book is already on loan")
    book["available"] = False
    lid = _new_id(state, "ln", "next_loan")
    state["loans"][lid] = {"book_id": book_id, "member_id": member_id, "due": state["due"]}
    return {"ok": True, "loan_id": lid}


def _check_due_date(state, loan_id):
    return {"loan_id": loan_id, "due": _row(state["loans"], loan_id, "loan")["due"]}


LIBRARY_TOOLS = [
    tool_schema("find_book", "Find a book's id by title.", title="string"),
    tool_schema("find_member", "Find a member's id by name.", name="string"),
    tool_schema("borrow_book", "Lend a book to a member.", book_id="string", member_id="string"),
    tool_schema("check_due_date", "Get the due date of a loan.", loan_id="string"),
]


def _gen_library(rng: random.Random) -> Instance:
    titles, names = rng.sample(BOOKS, 4), rng.sample(NAMES, 3)
    bids, mids = _ids(rng, "bk", 4), _ids(rng, "m", 3)
    state = {
        "books": {b: {"title": t, "available": True} for b, t in zip(bids, titles)},
        "members": {m: {"name": n} for m, n in zip(mids, names)},
        "loans": {},
        "next_loan": rng.randrange(1000, 9000),
        "due": f"{rng.choice(MONTHS)} {rng.randrange(1, 29)}",
    }
    book, name = titles[0], names[0]
    first = [[_c("find_book", title=book), _c("find_member", name=name)], [_c("borrow_book", book_id=bids[0], member_id=mids[0])]]
    if rng.random() < 0.6:
        user = rng.choice((
            "Lend {book} to {name}, then tell me the due date.",
            "Check out {book} for {name} and tell me when it is due.",
        )).format(book=book, name=name)
        return Instance("loan_due", user, state, first + [[_c("check_due_date", loan_id=f"ln-{state['next_loan']}")]],
                        _quote(2, "due", f"{book} is due on {{}}."))
    user = rng.choice((
        "Lend {book} to {name} and give me the loan id.",
        "Check out {book} for {name}, then tell me the loan id.",
    )).format(book=book, name=name)
    return Instance("loan_id", user, state, first, _quote(1, "loan_id", "Done. The loan id is {}."))


# -------------------------------------------------------------------- travel (content OOD)


def _find_flight(state, origin, destination):
    fid = next((f for f, row in state["flights"].items() if row["from"] == origin and row["to"] == destination), None)
    if fid is None:
        raise ToolError(f"no flight from {origin} to {destination}")
    return {"flight_id": fid}


def _book_flight(state, flight_id, passenger):
    _row(state["flights"], flight_id, "flight")
    if not passenger.strip():
        raise ToolError("passenger is empty")
    rid = _new_id(state, "res", "next_booking")
    state["bookings"][rid] = {"flight_id": flight_id, "passenger": passenger, "seat": state["seat"]}
    return {"ok": True, "booking_id": rid}


def _get_booking(state, booking_id):
    return {"booking_id": booking_id, **_row(state["bookings"], booking_id, "booking")}


TRAVEL_TOOLS = [
    tool_schema("find_flight", "Find a flight id by route.", origin="string", destination="string"),
    tool_schema("book_flight", "Book a seat for a passenger.", flight_id="string", passenger="string"),
    tool_schema("get_booking", "Get a booking's details.", booking_id="string"),
]


def _gen_travel(rng: random.Random) -> Instance:
    cities = rng.sample(CITIES, 5)
    routes = [(cities[0], cities[1]), (cities[1], cities[0]), (cities[0], cities[2]), (cities[3], cities[4])]
    fids = _ids(rng, "fl", len(routes))
    state = {
        "flights": {f: {"from": o, "to": d} for f, (o, d) in zip(fids, routes)},
        "bookings": {},
        "next_booking": rng.randrange(1000, 9000),
        "seat": f"{rng.randrange(1, 40)}{rng.choice('ABCDEF')}",
    }
    (origin, dest), name = routes[0], rng.choice(NAMES)
    first = [[_c("find_flight", origin=origin, destination=dest)], [_c("book_flight", flight_id=fids[0], passenger=name)]]
    if rng.random() < 0.6:
        user = rng.choice((
            "Book a flight from {o} to {d} for {name}, then tell me the seat.",
            "Get {name} a flight from {o} to {d} and tell me the seat number.",
        )).format(o=origin, d=dest, name=name)
        rid = f"res-{state['next_booking']}"
        return Instance("booking_seat", user, state, first + [[_c("get_booking", booking_id=rid)]],
                        _quote(2, "seat", f"{name} has seat {{}}."))
    user = rng.choice((
        "Book a flight from {o} to {d} for {name} and give me the booking id.",
        "Get {name} a flight from {o} to {d}, then tell me the booking id.",
    )).format(o=origin, d=dest, name=name)
    return Instance("booking_id", user, state, first, _quote(1, "booking_id", "Booked. The booking id is {}."))


# ------------------------------------------------------------------------------- registry

FAMILIES: dict[str, Family] = {
    "bank": Family("bank", BANK_TOOLS, {"find_account": _find_account, "transfer": _transfer, "get_balance": _get_balance}, _gen_bank),
    "inventory": Family("inventory", INVENTORY_TOOLS, {"find_item": _find_item, "check_stock": _check_stock, "restock": _restock}, _gen_inventory),
    "calendar": Family("calendar", CALENDAR_TOOLS, {"find_contact": _find_contact, "create_event": _create_event, "list_events": _list_events}, _gen_calendar),
    "library": Family("library", LIBRARY_TOOLS, {"find_book": _find_book, "find_member": _find_member, "borrow_book": _borrow_book, "check_due_date": _check_due_date}, _gen_library),
    "travel": Family("travel", TRAVEL_TOOLS, {"find_flight": _find_flight, "book_flight": _book_flight, "get_booking": _get_booking}, _gen_travel),
}

#: Families of each split (format_ood reuses the test instances).
SPLIT_FAMILIES: dict[str, tuple[str, ...]] = {
    "train": ("bank", "inventory", "calendar"),
    "test": ("bank", "inventory", "calendar"),
    "format_ood": ("bank", "inventory", "calendar"),
    "content_ood": ("library", "travel"),
}
