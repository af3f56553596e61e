"""Router-pattern analysis (App. B.7, Fig. 14): pure functions over Routing, shared by callbacks and notebooks."""
