"""The OpenSIPS management interface (MI), served and spoken.

protocol.py JSON-RPC 2.0 envelope: the error codes, parse a request, build the reply
dispatch.py handle(): one request run end to end (parse, command, reply)
commands.py the commands (evi:subscribe, evi:list, ...), OpenSIPS's replies
server.py   the HTTP listener (POST /mi, GET /metrics, /health, /ready): event loop, TLS
http.py     HTTP parsing (bytes in, a request or a status out) and the request checks
            (Origin, Host, Content-Type), pure; refusal counters
datagram.py the UDP datagram listener (one request per datagram)
health.py   what GET /ready answers: the reasons the engine is not ready
webconfig.py the web config file: TLS context and basic auth (exporter-toolkit format)
datagram_guard.py  which datagrams the UDP MI answers (no reflection), error rate limit
fifo.py     the mi_fifo transport
client.py   an MI client (http, udp, fifo targets) for the CLI and the sources
http_client.py  its HTTP POST: a whole-call deadline and a reply-size limit
"""
