"""The OpenSIPS management interface (MI), served and spoken.

protocol.py JSON-RPC 2.0 envelope: parse a request, dispatch, build the reply
commands.py the commands (evi:subscribe, evi:list, ...), OpenSIPS's replies
server.py   HTTP (POST /mi, GET /metrics) and UDP datagram listeners
fifo.py     the mi_fifo transport
client.py   an MI client (http, udp, fifo targets) for the CLI and the sources
http_client.py  its HTTP POST: a whole-call deadline and a reply-size limit
"""
