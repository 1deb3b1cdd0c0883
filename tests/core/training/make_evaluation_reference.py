#!/usr/bin/python3
"""Reference numbers for evaluation_test.cc, from scikit-learn and exact
integer arithmetic (not from the code under test). Run with /usr/bin/python3;
paste what it prints into the test if the cases change."""
import math
from fractions import Fraction

import numpy as np
from sklearn.metrics import (accuracy_score, confusion_matrix, log_loss,
                             precision_recall_fscore_support)

# ScorePredictions' 3-class, 6-example case (row 1 ties classes 0 and 1).
p = np.array([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2], [0.1, 0.8, 0.1],
              [0.3, 0.3, 0.4], [0.25, 0.25, 0.5], [0.1, 0.2, 0.7]])
y = np.array([0, 1, 1, 0, 2, 2])
pred = p.argmax(1)
print("pred", pred.tolist())
print("confusion", confusion_matrix(y, pred, labels=[0, 1, 2]).ravel().tolist())
print("accuracy %.17g" % accuracy_score(y, pred))
prec, rec, f1, sup = precision_recall_fscore_support(y, pred, labels=[0, 1, 2],
                                                     zero_division=0)
print("precision", ["%.17g" % v for v in prec])
print("recall", ["%.17g" % v for v in rec])
print("f1", ["%.17g" % v for v in f1])
print("support", sup.tolist())
# eps=1e-15 is the clip the header documents (scikit-learn's default before 1.2).
print("log_loss %.17g" % log_loss(y, p, eps=1e-15, labels=[0, 1, 2]))
print("clipped log_loss %.17g" % ((-math.log(1e-15) + math.log(2)) / 2))


def mcnemar(b, c):
    """Exact two-sided binomial p-value, with integers until the last step."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    term, total = 1, 0
    for i in range(k + 1):
        total += term
        term = term * (n - i) // (i + 1)
    return float(min(Fraction(1), Fraction(2 * total, 2 ** n)))


for b, c in [(1, 9), (0, 3), (9, 1), (5, 5), (49000, 51000), (10, 30)]:
    print("mcnemar(%d, %d) = %.17g" % (b, c, mcnemar(b, c)))
