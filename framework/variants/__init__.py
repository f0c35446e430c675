"""SAE kinds beyond TopK/AbsTopK; importing this package registers them in
framework.sae.SAE_KINDS (math of every kind: README.md in this folder).

    batchtopk, mutual_choice, feature_choice   (choice.py)
    topafa                                      (topafa.py)
    gsae  (+ lm_activation_grads)               (gsae.py)
    mpsae                                       (mpsae.py)
    matryoshka                                  (matryoshka.py)
    vtopk                                       (vtopk.py)
    jumprelu                                    (jumprelu.py)
"""

from framework.variants import choice, gsae, jumprelu, matryoshka, mpsae, topafa, vtopk  # noqa: F401  (registration)
from framework.variants.gsae import grad_key, lm_activation_grads  # noqa: F401
