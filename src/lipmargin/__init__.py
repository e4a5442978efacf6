"""lipmargin: Lipschitz-Margin Training and certification (Tsuzuku, Sato, Sugiyama, NeurIPS 2018)."""

__version__ = "0.1.0"
