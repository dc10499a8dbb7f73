"""Health of agents: active checks of the local agent, its lifecycle, A2A cards,
passive outlier detection and the panic policy.
"""
