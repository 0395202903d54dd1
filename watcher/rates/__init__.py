"""Live prices (contract section 9): Chainlink feeds read on the chains' own nodes and HTTP
sources, refreshed in the background, combined per pair, and used to quote invoices in any
currency the pairs reach from USD.

`aggregate` (a pair from its sources) and `quoting` (an asset in a currency) are pure;
`sources` read the outside world; `book` keeps the last good answers and refreshes them on
apscheduler; `routes` serves `GET /v1/rates`.
"""
