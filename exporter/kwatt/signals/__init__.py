"""Grid signals the exporter publishes next to energy: carbon intensity and energy price.

Each signal has one source of a kind chosen in config (static, an HTTP API, a file the
operator updates). Fetched kinds run on their own thread and period (poller.py) and hand
their latest value to the sampler cycle (stage.py); scrapes render what the cycle published
and never wait on a fetch.
"""
