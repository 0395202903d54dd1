"""The deposit addresses worth a look for money left on them: those of the address rail that
a payment (of any role or status) was ever seen to. An address nobody paid holds nothing the
watcher knows of, and reading every address ever handed out would cost a node call each."""

from __future__ import annotations

from collections.abc import Iterable

from sqlite_utils import Database


def paid_deposit_addresses(db: Database, networks: Iterable[str] | None = None) -> list[dict]:
    """One row per paid address-rail option, oldest derivation first per network:
    network, address, derivation_index, asset, token_contract, decimals."""
    where, params = "", []
    if networks is not None:
        names = list(networks)
        where = f"AND o.network IN ({', '.join('?' * len(names))})" if names else "AND 0"
        params = names
    rows = db.execute(
        f"""
        SELECT o.network, o.destination_address AS address, o.derivation_index, o.asset,
               o.token_contract, o.decimals
        FROM payment_options o
        WHERE o.id IN (SELECT DISTINCT option_id FROM payments) AND o.rail = 'address' {where}
        ORDER BY o.network, o.derivation_index, o.id
        """,
        params,
    ).fetchall()
    return [
        dict(
            zip(
                ("network", "address", "derivation_index", "asset", "token_contract", "decimals"),
                r,
                strict=True,
            )
        )
        for r in rows
    ]
