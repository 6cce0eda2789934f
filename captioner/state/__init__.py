"""The SQL truth: schema, sessions, migrations, and every status change."""
