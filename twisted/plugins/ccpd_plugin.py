from twisted.application.service import ServiceMaker

Ccpd = ServiceMaker(
    "ccpd", "ccpd.tap", "Local gateway for coding agents (Anthropic Messages API)", "ccpd"
)
