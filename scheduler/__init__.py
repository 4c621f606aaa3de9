"""Every decision about what runs when and where: runtime policies (plain Python) and the planner."""
