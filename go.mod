module github.com/coherentcache/coherent

go 1.26.0

require (
	github.com/hashicorp/golang-lru/v2 v2.0.7 // indirect
	golang.org/x/sync v0.25.0 // indirect
)
