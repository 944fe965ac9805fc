"""The workspace: notebook helpers, experiments over several runs, and plots."""
