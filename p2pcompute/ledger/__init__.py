"""The signed, replicated credit ledger: entry codec, validation, SQLite store."""
