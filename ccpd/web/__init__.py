"""ccpd's HTTP side: the Klein application, the proxy and the site that serves them."""
