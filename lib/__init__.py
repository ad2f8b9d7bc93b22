"""Pure Spark transforms for the email-personalization job suite (no file or environment access)."""
