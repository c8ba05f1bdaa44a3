"""Teams: AgentChat group chats whose members run in separate agent jobs, coordinated over NATS.

``models`` (the records), ``service`` (CRUD), ``build`` (the AgentChat team for a run), ``dispatch`` (tasks on
teams: start, human input, cancel) and ``runner`` (the group-chat managers: a durable work queue the control
plane's replicas share).
"""
