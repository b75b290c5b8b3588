"""Task registry: declarative task cards (tasks/cards/*.yaml), the loaders that read their data,
and the instruction templates that wrap prompts. Public entry points live in tasks.registry and
tasks.instructions."""
