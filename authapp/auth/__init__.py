"""The auth blueprint: routes (thin views), service (the logic), tokens, passwords."""
