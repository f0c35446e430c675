"""SAE kinds beyond TopK/AbsTopK (math of every kind: README.md in this folder). Each module
registers its kinds in framework.sae.SAE_KINDS; framework/kinds.py imports them all.

    batchtopk, mutual_choice, feature_choice   (choice.py)
    topafa                                      (topafa.py)
    gsae                                        (gsae.py)
    mpsae                                       (mpsae.py)
    matryoshka                                  (matryoshka.py)
    vtopk                                       (vtopk.py)
    jumprelu                                    (jumprelu.py)
    clt                                         (clt.py)
"""
