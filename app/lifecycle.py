"""Deletes, undeletes and merges: what a record deleted in Salesforce does to its Drupal user.

A notification whose fields say ``IsDeleted = true`` (a reconcile's or refetch's queryAll row,
or a record gone since) is a deletion; with ``MasterRecordId`` set it is the loser of a merge.
The rules, decided beside the planner's in the same transaction:

- order first: a deletion older than (or as old as) the version applied is `stale`/`duplicate`;
- a converted Lead's deletion or merge changes nothing (`deleted`): its user is the Contact's;
  one whose conversion sfrelay has not applied yet converts (`converted`), as its live version
  would;
- a merge loser hands its Drupal user to the survivor when the survivor has none (`merged`);
  when both have users, the loser's user is blocked (`blocked`, detail names both Ids);
- otherwise SFRELAY_ON_DELETE: `block` (status 0, with the cache invalidation Drupal's save
  does; remembered in sfrelay_block), `unlink` (the mapping is forgotten, the user kept) or
  `ignore`; `deleted` when there is nothing to change (detail: why);
- a live version of a record whose user sfrelay blocked unblocks it (`unblocked`); a user
  blocked by anyone else (a Drupal administrator) is never unblocked by sfrelay;
- a protected user (uid 0, uid 1, a protected role: the planner's `_protection`) is never
  blocked, unblocked, unlinked or handed over: `conflict_protected_user`, nothing written;
- sfrelay never deletes a user row: Drupal's cancel methods reassign or delete the user's
  content, which a database writer cannot do safely.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import BigInteger, Column, Double, String, Table, delete
from sqlalchemy.ext.asyncio import AsyncConnection

from app.drupal import ledger
from app.drupal.bulk import insert_rows, select_in
from app.drupal.ledger import RecordState, metadata
from app.drupal.users import UserChange, chunks
from app.outcomes import OutcomeKind
from app.plan import SUPERUSERS, Planner
from app.records import Record, as_status
from app.sfid import sf_key

blocks = Table(
    "sfrelay_block",
    metadata,
    Column("uid", BigInteger, primary_key=True, autoincrement=False),
    Column("sf_id", String(18), nullable=False),
    Column("blocked_at", Double, nullable=False),
)


def is_deletion(fields: dict[str, Any]) -> bool:
    return fields.get("IsDeleted") in (True, "true", "1", 1)


def merged_into(fields: dict[str, Any]) -> str | None:
    master = fields.get("MasterRecordId")
    return sf_key(master) if is_deletion(fields) and isinstance(master, str) and master else None


# A live version written to a user: its mapped status too.
_WRITTEN = (OutcomeKind.CREATED, OutcomeKind.UPDATED, OutcomeKind.LINKED)


class Lifecycle:
    """Deletions and unblocks for one batch, written through the planner's plan."""

    def __init__(self, planner: Planner, on_delete: str, major: int) -> None:
        self.planner, self.on_delete, self.major = planner, on_delete, major
        self.ours: dict[int, str] = {}  # uid -> Id of the record sfrelay blocked it for
        self.status: dict[int, int] = {}
        self.block: dict[int, str] = {}  # to insert into sfrelay_block
        self.unblock: set[int] = set()  # to delete from it

    async def load(self, conn: AsyncConnection, records: list[Record]) -> None:
        states = self.planner.plan.states
        survivors = {m for r in records if (m := merged_into(r.fields))} - states.keys()
        loaded = await ledger.load(conn, survivors)
        states.update(loaded)
        mapped = {s.uid for s in loaded.values() if s.uid is not None}
        missing = [u for u in mapped if u not in self.planner.existing]
        self.planner.existing.update(await self.planner.store.users(conn, missing))
        self.planner.forget_gone_users(loaded.values())
        uids = sorted({s.uid for s in states.values() if s.uid is not None and s.uid > 0})
        await self.load_blocks(conn)
        self.status = await _statuses(conn, self.major, uids)

    async def load_blocks(self, conn: AsyncConnection) -> None:
        """For a batch without deletions: only whether sfrelay blocked any of its users (those
        of its records, and those found by email, which a record may link)."""
        states = self.planner.plan.states
        mapped = {s.uid for s in states.values() if s.uid is not None and s.uid > 0}
        forgotten = self.planner.forgotten
        uids = sorted(mapped | set(self.planner.existing) | set(forgotten))
        ours = await select_in(conn, "SELECT uid, sf_id FROM sfrelay_block WHERE uid {in}", uids)
        for uid, sf_id in ours:
            if forgotten.get(int(uid)) == sf_id:  # its user was deleted in Drupal: no block
                self.unblock.add(int(uid))
            else:
                self.ours[int(uid)] = sf_id
        if self.ours:
            self.status = await _statuses(conn, self.major, self.ours)

    def decide(self, r: Record) -> None:
        """A deletion (is_deletion(r.fields))."""
        p = self.planner
        st = p.plan.states.get(r.sf_id)
        if st is not None and r.modstamp is not None and st.modstamp is not None:
            if r.modstamp < st.modstamp:
                return p._set_outcome(r, OutcomeKind.STALE, st.uid)
            if r.modstamp == st.modstamp and p.same_version(r, st):
                return p._set_outcome(r, OutcomeKind.DUPLICATE, st.uid)
        uid = st.uid if st is not None else None
        master = merged_into(r.fields)
        if st is not None and st.converted_to:
            # Its user went to the Contact at the conversion: the Contact's to block or hand over.
            why = f"the Lead was converted to {st.converted_to}, whose user it is"
            return p._set_outcome(r, OutcomeKind.DELETED, None, why, applied=True)
        if r.converted_to:
            # A converted Lead deleted (a clean-up of converted Leads) before sfrelay saw its
            # conversion, or in the same batch: the conversion, not a deletion of the user.
            return p._convert(r, st)
        if uid is None or uid < 0:
            why = "the record has no Drupal user"
            return p._set_outcome(r, OutcomeKind.DELETED, None, why, applied=True)
        if master is not None:
            survivor = p.plan.states.get(master)
            if survivor is None or survivor.uid is None or survivor.converted_to:
                return self._hand_over(r, uid, master)
            detail = f"{r.sf_id} merged into {master}, which has uid {survivor.uid}"
            return self._block(r, uid, detail)
        if self.on_delete == "ignore":
            return p._set_outcome(
                r, OutcomeKind.DELETED, uid, "SFRELAY_ON_DELETE=ignore", applied=True
            )
        if self.on_delete == "unlink":
            assert st is not None
            if self._refused(r, uid, None):
                return None
            st.uid, st.user_key, st.dirty = None, None, True
            p.owner.pop(uid, None)
            return p._set_outcome(r, OutcomeKind.UNLINKED, uid, applied=True)
        return self._block(r, uid, None)

    def _refused(self, r: Record, uid: int, detail: str | None) -> bool:
        """The planner's protected-user guard (uid 0, 1, a protected role), before any change
        to a user: `conflict_protected_user`, nothing written, the deletion not applied (a
        later one acts once the role is gone). A user gone from Drupal is the caller's case."""
        p = self.planner
        if uid not in SUPERUSERS and uid not in p.existing:
            return False
        why = p._protection(uid)
        if why is None:
            return False
        p._set_outcome(r, OutcomeKind.CONFLICT_PROTECTED_USER, uid, _join(detail, why))
        return True

    def _hand_over(self, r: Record, uid: int, master: str) -> None:
        p = self.planner
        if self._refused(r, uid, f"{r.sf_id} merged into {master}"):
            return
        loser = p.plan.states[r.sf_id]
        survivor = p.plan.states.setdefault(master, RecordState(master, r.obj.sobject))
        # The survivor's own versions apply from now on: it starts without a modstamp.
        survivor.uid, survivor.object, survivor.converted_to = uid, r.obj.sobject, None
        survivor.user_key, survivor.dirty = loser.user_key, True
        loser.uid, loser.user_key, loser.dirty = None, None, True
        p.owner[uid] = master
        ids = {f: master for f, source in r.obj.fields.items() if source == "Id"}
        if ids and uid in p.existing:
            self._change(uid).fields.update(ids)
        detail = f"{r.sf_id} merged into {master}: its user now belongs to {master}"
        p._set_outcome(r, OutcomeKind.MERGED, uid, detail, applied=True)

    def _block(self, r: Record, uid: int, detail: str | None) -> None:
        p = self.planner
        if self._refused(r, uid, detail):
            return None
        if uid not in p.existing:
            why = f"uid {uid} no longer exists in Drupal"
            return p._set_outcome(r, OutcomeKind.DELETED, uid, _join(detail, why), applied=True)
        if self.status.get(uid) == 0 and uid not in self.ours:
            why = f"uid {uid} was already blocked (not by sfrelay)"
            return p._set_outcome(r, OutcomeKind.DELETED, uid, _join(detail, why), applied=True)
        self._change(uid).base["status"] = 0
        self.status[uid] = 0
        self.ours[uid] = self.block[uid] = r.sf_id
        self.unblock.discard(uid)
        p._set_outcome(r, OutcomeKind.BLOCKED, uid, detail, applied=True)

    def after_live(self, r: Record) -> None:
        """After the planner applied a live version: unblock a user sfrelay blocked for it."""
        p = self.planner
        decision = p.plan.decisions.get(r.index)
        if decision is None or decision.uid is None:
            return
        source = r.obj.base.get("status")
        if source is not None and source in r.fields and decision.kind in _WRITTEN:
            return self._mapped_status(r, decision.uid, as_status(r.fields[source]))
        if decision.kind not in (OutcomeKind.UPDATED, OutcomeKind.LINKED):
            return
        uid = decision.uid
        if uid is None or self.ours.get(uid) != r.sf_id or p._protection(uid):
            return  # (the planner refuses a protected user's update before this)
        if self.status.get(uid) == 0:
            self._change(uid).base["status"] = 1
            self.status[uid] = 1
        del self.ours[uid]
        self.block.pop(uid, None)
        self.unblock.add(uid)
        p._set_outcome(r, OutcomeKind.UNBLOCKED, uid, f"{r.sf_id} is live again", applied=True)

    def _mapped_status(self, r: Record, uid: int, wanted: int) -> None:
        """A status the field map sets (the planner wrote it into the user's change): a block
        is remembered as sfrelay's, and only sfrelay's own block is lifted. A user blocked in
        Drupal (a banned spammer whose email a Lead carries) stays blocked."""
        if uid < 0:  # created in this batch: its block is remembered under its uid in save()
            if wanted == 0:
                self.ours[uid] = self.block[uid] = r.sf_id
            else:
                self.ours.pop(uid, None)
                self.block.pop(uid, None)
            return
        current = self.status.get(uid, self.planner.existing[uid].status)
        if current == 1 and uid in self.ours:  # lifted meanwhile, in Drupal: not sfrelay's now
            del self.ours[uid]
            self.block.pop(uid, None)
            self.unblock.add(uid)
        # sfrelay's block, whichever record it was for: a converted Lead's, a merge's loser's,
        # an unlinked record's, are this user's record's predecessors.
        mine = uid in self.ours
        if wanted == 0:
            if current != 0:
                self.ours[uid] = self.block[uid] = r.sf_id
                self.unblock.discard(uid)
            self.status[uid] = 0
        elif current == 0 and not mine:
            self._change(uid).base.pop("status", None)
            why = "status stays 0: the user was blocked in Drupal, not by sfrelay"
            decision = self.planner.plan.decisions[r.index]
            self.planner._set_outcome(r, decision.kind, uid, why, applied=True)
        elif mine:
            self.status[uid] = 1
            del self.ours[uid]
            self.block.pop(uid, None)
            self.unblock.add(uid)

    def _change(self, uid: int) -> UserChange:
        changes = self.planner.plan.changes
        change = changes.get(uid)
        if change is None:
            langcodes = self.planner.existing[uid].langcodes
            change = changes[uid] = UserChange(uid, {}, {}, (), langcodes)
        return change

    async def save(self, conn: AsyncConnection, now: float) -> None:
        """After Plan.resolve_new_uids: a user created blocked has its uid now (a row left
        for that uid, should the database have given it before, is replaced)."""
        resolve = self.planner.plan.resolve
        block = {resolve(uid): sf_id for uid, sf_id in self.block.items()}
        for chunk in chunks(sorted(self.unblock | set(block))):
            await conn.execute(delete(blocks).where(blocks.c.uid.in_(chunk)))
        rows = [(uid, sf_id, now) for uid, sf_id in sorted(block.items())]
        await insert_rows(conn, blocks.name, ("uid", "sf_id", "blocked_at"), rows)


def _join(first: str | None, second: str) -> str:
    return f"{first}; {second}" if first else second


async def _statuses(conn: AsyncConnection, major: int, uids: Iterable[int]) -> dict[int, int]:
    """uid -> status (1 active, 0 blocked) of the users that exist."""
    table = "users_field_data" if major >= 8 else "users"
    found: dict[int, int] = {}
    read = f"SELECT uid, status FROM {table} WHERE uid {{in}}"  # noqa: S608
    for uid, status in await select_in(conn, read, sorted(set(uids))):
        found[int(uid)] = min(found.get(int(uid), 1), int(status))
    return found


async def decide_batch(
    conn: AsyncConnection, planner: Planner, records: list[Record], on_delete: str, major: int
) -> Lifecycle:
    """Decide every record of a batch: deletions first (a live version after a deletion in the
    same batch is then an undelete), live versions by the planner, then unblocks."""
    lifecycle = Lifecycle(planner, on_delete, major)
    if any(is_deletion(r.fields) for r in records):
        await lifecycle.load(conn, records)
        for record in records:
            if is_deletion(record.fields):
                lifecycle.decide(record)
    elif planner.plan.states:
        await lifecycle.load_blocks(conn)
    for record in records:
        if not is_deletion(record.fields):
            planner.decide(record)
            lifecycle.after_live(record)
    return lifecycle
