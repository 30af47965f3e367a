"""Small helpers shared by tasks: atomic writes, run folders, seeding."""
