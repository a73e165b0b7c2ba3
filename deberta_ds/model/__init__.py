from deberta_ds.model.encoder import Encoder
from deberta_ds.model.rtd import ReplacedTokenDetection, RTDOutput

__all__ = ["Encoder", "ReplacedTokenDetection", "RTDOutput"]
